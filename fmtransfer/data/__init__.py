"""Data: recipes -> sample tables -> datasets -> one LightningDataModule."""

from fmtransfer.data.datamodule import RecipeDataModule
from fmtransfer.data.preprocess import Preprocess
from fmtransfer.data.recipe import Recipe, load_recipe
from fmtransfer.data.table import SampleTable, build_table

__all__ = ["Preprocess", "Recipe", "RecipeDataModule", "SampleTable", "build_table", "load_recipe"]
