"""Models: the backbone factory over timm, the classifier and its artifact format, the Lightning module."""

from fmtransfer.models.backbone import BackboneSpec, backbone_spec, create_backbone
from fmtransfer.models.classifier import Classifier, load_model, save_model

__all__ = ["BackboneSpec", "Classifier", "backbone_spec", "create_backbone", "load_model", "save_model"]
