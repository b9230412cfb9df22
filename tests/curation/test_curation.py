"""Curation functions on synthetic embeddings with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from fmtransfer.clustering import assign
from fmtransfer.curation.curate import CurationSettings, curate_embeddings
from fmtransfer.curation.dedup import near_duplicate_groups
from fmtransfer.curation.kmeans import Resample, hierarchical_kmeans, resampled_kmeans
from fmtransfer.curation.sampling import WithinCluster, balanced_sample, stratified_sample, waterfill
from fmtransfer.errors import ConfigError, DataError


def skewed(seed: int = 0, big: int = 4000, small: int = 20, per_small: int = 40, d: int = 16):
    """One huge, dense cluster at the origin and ``small`` tight, far-apart small clusters.

    Returns:
        x (n, d) float32; mode (n,) int: 0 for the huge cluster, 1.. for the small ones.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(small, d)) * 10
    x = [rng.normal(size=(big, d)) * 0.5] + [c + rng.normal(size=(per_small, d)) * 0.3 for c in centers]
    mode = np.concatenate([np.zeros(big, int)] + [np.full(per_small, i + 1) for i in range(small)])
    return np.concatenate(x).astype(np.float32), mode


def test_waterfill_is_even_and_capped():
    rng = np.random.default_rng(0)
    q = waterfill(np.array([100, 3, 50, 0, 7]), 40, rng)
    assert q.sum() == 40 and (q <= [100, 3, 50, 0, 7]).all()
    assert q[1] == 3 and q[4] == 7 and q[3] == 0 and abs(int(q[0]) - int(q[2])) <= 1
    assert waterfill(np.array([2, 2]), 10, rng).tolist() == [2, 2]


def test_a_balance_floor_keeps_a_dense_mode_near_its_own_weight():
    """Plain balance gives the dense mode (4,000 of 4,800 points, 83%) a small share; with balance_floor=0.5 half
    the budget is spread in proportion to cluster size, so the mode keeps at least half its pool share, and with
    1 the sample is proportional."""
    x, mode = skewed()
    tree = hierarchical_kmeans(x, [60, 12], steps=5, seed=0)
    pool_share = np.mean(mode == 0)

    def dense_share(floor):
        picked = balanced_sample(tree, 480, seed=0, floor=floor)
        assert len(picked) == 480 and len(np.unique(picked)) == 480
        return np.mean(mode[picked] == 0)

    assert dense_share(0.0) < 0.5 * pool_share
    assert 0.5 * pool_share <= dense_share(0.5) < pool_share
    assert dense_share(1.0) == pytest.approx(pool_share, abs=0.02)


def test_a_floor_of_1_is_proportional_to_the_last_point():
    """floor=1: every finest cluster gets its proportional share, rounded by largest remainders; rounding each down
    handed the leftovers (up to one a cluster) to the balanced rest, i.e. to the smallest clusters."""
    from fmtransfer.curation.kmeans import Hierarchy

    labels = np.repeat(np.arange(6), [46, 46, 2, 2, 2, 2])
    tree = Hierarchy([6, 2], labels, [np.array([0, 0, 1, 1, 1, 1])], [np.eye(6, dtype=np.float32), np.eye(2, 6)])
    picked = balanced_sample(tree, 10, seed=0, floor=1.0)
    assert np.bincount(labels[picked], minlength=6).tolist() == [5, 5, 0, 0, 0, 0]  # 4.6, 4.6, 0.2 x 4
    picked = balanced_sample(tree, 23, seed=0, floor=1.0)
    counts = np.bincount(labels[picked], minlength=6)
    assert counts[:2].tolist() == [11, 11] and counts[2:].sum() == 1  # 10.58 x 2, 0.46 x 4

def test_a_stratum_short_of_points_after_dedup_passes_its_share_on():
    """A class that dedup left with fewer samples than its share gives all it has; the others fill the target
    (this raised "target is larger than the points available" before)."""
    x, mode = skewed(big=600, small=4, per_small=100)
    tree = hierarchical_kmeans(x, [20, 4], steps=2, seed=0)
    strata = np.where(mode == 0, "common", np.where(mode == 1, "tight", "other"))
    kept = np.ones(len(x), dtype=bool)
    kept[np.flatnonzero(mode == 1)[10:]] = False  # dedup left 10 of the tight class's 100
    picked = stratified_sample(tree, 300, strata, mask=kept, seed=0)
    assert len(picked) == 300 and len(np.unique(picked)) == 300 and kept[picked].all()
    assert (strata[picked] == "tight").sum() == 10



def test_a_stratum_short_of_points_is_said_in_the_log_and_the_result():
    """The issue's stratify_by=label case: a class that dedup left short gives what it has, and the curation says
    how many it took and how many went to the others (it passed the rest on silently before)."""
    x, mode = skewed(big=600, small=4, per_small=100)
    x[np.flatnonzero(mode == 1)[10:]] = x[np.flatnonzero(mode == 1)[0]]  # 90 exact copies: dedup leaves 10 of 100
    strata = np.where(mode == 0, "common", np.where(mode == 1, "tight", "other"))
    logged = []
    cur = curate_embeddings(x, CurationSettings(target_size=300, levels=[20, 4], resampling_steps=2,
                                                stratify_by="label"), strata=strata, log=logged.append)
    assert (strata[cur.selected] == "tight").sum() <= 10 and len(cur.selected) == 300
    assert len(cur.notes) == 1 and "'tight'" in cur.notes[0] and "all" in cur.notes[0]
    taken, share = (strata[cur.selected] == "tight").sum(), int(300 * 100 / len(x))
    assert f"all {taken} are taken and the other {share - taken} go to" in cur.notes[0]
    assert any(cur.notes[0] in line for line in logged)

def test_self_checks_warn_when_dedup_or_balance_hurts_a_class():
    from fmtransfer.curation.checks import CheckSettings, self_checks

    classes = np.repeat(["a", "b", "c", "d"], 100)
    kept = np.ones(400, dtype=bool)
    kept[100:160] = False  # dedup took 60% of class b
    selected = np.concatenate([np.arange(0, 30), np.arange(160, 165), np.arange(200, 230), np.arange(300, 330)])
    checks = self_checks({"class": classes, "cluster": np.repeat([0, 1], 200)}, selected, kept, CheckSettings())
    warnings = "\n".join(checks["warnings"])
    assert checks["dedup_share"] == 0.15 and "dedup removed 15.0% of the pool (60 of 400)" in warnings
    assert "dedup removed 60% of class 'b'" in warnings
    assert "class 'b' holds 5.3% of the curated subset against 25.0% of the pool" in warnings
    assert "class 'a'" not in warnings and "cluster" not in warnings.replace("curation.checks", "")
    b = checks["by"]["class"]["groups"]["b"]
    assert (b["pool"], b["curated"], b["dedup_removed"]) == (100, 5, 60)
    assert checks["by"]["class"]["imbalance"] == {"pool": 1.0, "curated": 6.0}
    even = self_checks({"class": classes}, np.arange(0, 400, 4), np.ones(400, dtype=bool), CheckSettings())
    assert even["warnings"] == [] and even["by"]["class"]["entropy"]["curated"] == pytest.approx(1.0)


def test_self_checks_say_when_a_balanced_pool_comes_out_uneven():
    """A labelled pool with even classes whose curated subset is not (as on Fashion-MNIST: bag 1.64x, trouser 0.54x)
    gets a recommendation: a random subset or stratify_by=label; an even subset or an uneven pool does not."""
    from fmtransfer.curation.checks import CheckSettings, self_checks

    classes = np.repeat(["a", "b", "c", "d"], 100)
    kept = np.ones(400, dtype=bool)
    uneven = np.concatenate([np.arange(0, 40), np.arange(100, 115), np.arange(200, 225), np.arange(300, 320)])
    warnings = self_checks({"class": classes}, uneven, kept, CheckSettings())["warnings"]
    assert len(warnings) == 1 and "the pool's classes are balanced (largest / smallest 1.00)" in warnings[0]
    assert "curated subset's are not (2.67: class 'a' at 1.60x" in warnings[0]
    assert "'b' at 0.60x" in warnings[0] and "curation.stratify_by=label" in warnings[0]
    assert self_checks({"class": classes}, np.arange(0, 400, 4), kept, CheckSettings())["warnings"] == []
    skewed_pool = np.repeat(["a", "b", "c", "d"], [190, 70, 70, 70])
    assert not any("balanced" in w for w in self_checks({"class": skewed_pool}, uneven, kept, CheckSettings())["warnings"])


def test_small_clusters_are_over_represented_after_sampling():
    x, mode = skewed()
    tree = hierarchical_kmeans(x, [60, 12], steps=5, seed=0)
    paths = tree.paths()
    assert paths.shape == (len(x), 2) and (paths[:, 1] == tree.parents[0][tree.labels]).all()
    chosen = balanced_sample(tree, 500, seed=0)
    assert len(chosen) == 500 and len(np.unique(chosen)) == 500
    raw_share = (mode > 0).mean()
    curated_share = (mode[chosen] > 0).mean()
    assert curated_share > 2 * raw_share  # 0.167 raw
    assert len(np.unique(mode[chosen])) >= 20  # the small modes survive (two may share a cluster)
    random_share = (mode[np.random.default_rng(0).choice(len(x), 500, replace=False)] > 0).mean()
    assert curated_share > random_share + 0.2


@pytest.mark.slow
def test_seeding_and_resampling_spread_centroids_out_of_the_dense_region():
    """Uniform seeds (FAISS's own) follow density and leave small modes merged; k-means++ seeds give every mode a
    centroid; the resampling refinement then moves centroids out of the dense cluster (summed over four
    datasets, as single runs of k-means are noisy)."""
    def in_dense(c):
        return int((np.linalg.norm(c, axis=1) < 3).sum())  # the huge cluster lies within radius ~3 of 0

    def modes_found(c, x, mode):
        labels, _ = assign(x, c)
        return len({int(np.bincount(mode[labels == j]).argmax()) for j in np.unique(labels)} - {0})

    dense = {"random": 0, "kmeans++": 0, "resampled": 0}
    found = dict.fromkeys(dense, 0)
    for seed in range(4):
        x, mode = skewed(seed=seed)
        fits = {"random": resampled_kmeans(x, 40, steps=0, seed=0, plusplus=False)[0],
                "kmeans++": resampled_kmeans(x, 40, steps=0, seed=0)[0],
                "resampled": resampled_kmeans(x, 40, steps=8, seed=0, how=Resample.CLOSEST)[0]}
        for name, c in fits.items():
            dense[name] += in_dense(c)
            found[name] += modes_found(c, x, mode)
    assert found["random"] < found["kmeans++"] == found["resampled"] == 4 * 20
    assert dense["resampled"] < dense["kmeans++"] < dense["random"]


@pytest.mark.slow
@pytest.mark.parametrize("saving", [{"refit_niter": 5}, {"sample_per_centroid": 32},
                                    {"refit_niter": 5, "sample_per_centroid": 32}])
def test_the_cheaper_refinements_still_spread_centroids_out_of_the_dense_region(saving):
    """Shorter refits and refinement on a sample (what large pools use) keep what the resampling is for: every small
    mode keeps a centroid, and fewer centroids sit in the dense cluster than after the first fit."""
    dense = {"kmeans++": 0, "cheaper": 0}
    found = dict.fromkeys(dense, 0)
    for seed in range(4):
        x, mode = skewed(seed=seed)
        fits = {"kmeans++": resampled_kmeans(x, 40, steps=0, seed=0)[0],
                "cheaper": resampled_kmeans(x, 40, steps=8, seed=0, **saving)[0]}
        for name, c in fits.items():
            labels, _ = assign(x, c)
            dense[name] += int((np.linalg.norm(c, axis=1) < 3).sum())
            found[name] += len({int(np.bincount(mode[labels == j]).argmax()) for j in np.unique(labels)} - {0})
    assert found["cheaper"] == 4 * 20
    assert dense["cheaper"] < dense["kmeans++"]


def test_refits_run_refit_niter_and_the_first_fit_trains_on_fewer_points(monkeypatch):
    """The curation default (refit_niter=5) shortens every refit of the paper's scheme too (it applied to the sampled
    refinement only), and with refinements to come the first fit trains on 64 points a cluster, not FAISS's 256."""
    import fmtransfer.curation.kmeans as km

    calls, fit = [], km.kmeans

    def recording(x, k, **kw):
        calls.append((len(x), kw.get("niter"), kw.get("max_points_per_centroid")))
        return fit(x, k, **kw)

    monkeypatch.setattr(km, "kmeans", recording)
    x, _ = skewed(big=12000)  # 12,800 points: more than 40 x 256
    km.resampled_kmeans(x, 40, steps=3, seed=0, refit_niter=5)
    assert [c[1:] for c in calls] == [(20, 64)] + [(5, None)] * 3
    calls.clear()
    km.resampled_kmeans(x, 40, steps=0, seed=0)  # a single fit trains on FAISS's default share
    assert [c[1:] for c in calls] == [(20, None)]


def test_refinement_on_a_sample_assigns_every_point_once(monkeypatch):
    """With sample_per_centroid, the refits see k * sample_per_centroid points and the whole pool (a memmap on a
    large pool) is read for assignment once, at the end; every point still gets a label."""
    import fmtransfer.curation.kmeans as km

    sizes = []

    def counting(x, centroids, **kw):
        sizes.append(len(x))
        return assign(x, centroids, **kw)

    monkeypatch.setattr(km, "assign", counting)
    x, _ = skewed()
    centroids, labels = km.resampled_kmeans(x, 40, steps=3, seed=0, sample_per_centroid=25)
    assert sizes == [40 * 25] * 3 + [len(x)]
    assert labels.shape == (len(x),) and set(np.unique(labels)) <= set(range(40))
    sizes.clear()
    km.resampled_kmeans(x, 40, steps=3, seed=0)  # the paper's scheme: the whole pool at every step
    assert sizes == [len(x)] * 4


def test_closest_within_cluster_and_masks():
    x, mode = skewed(seed=2, big=600, small=5, per_small=30)
    tree = hierarchical_kmeans(x, [20, 4], steps=2, seed=0)
    chosen = balanced_sample(tree, 40, within=WithinCluster.CLOSEST, x=x)
    labels, dist = assign(x, tree.centroids[0])
    for c in np.unique(tree.labels[chosen]):  # each cluster gives its points nearest the centroid
        members = np.flatnonzero(tree.labels == c)
        taken = np.intersect1d(chosen, members)
        assert dist[taken].max() <= np.sort(dist[members])[len(taken) - 1] + 1e-6
    mask = mode != 0
    assert (mode[balanced_sample(tree, 50, mask=mask)] != 0).all()
    strata = np.where(mode == 3, "rare", "common")
    picked = stratified_sample(tree, 20, strata)
    assert len(picked) == 20 and (strata[picked] == "rare").any()


def test_near_duplicates_are_grouped():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 32)).astype(np.float32)
    copies = x[3] + rng.normal(size=(5, 32)).astype(np.float32) * 1e-3
    y = np.concatenate([x, copies])
    rep = near_duplicate_groups(y, threshold=0.999)
    assert (rep[200:] == 3).all() and rep[3] == 3
    assert (rep[:200] == np.arange(200)).all()
    assert int((rep == np.arange(len(y))).sum()) == 200


def test_a_chain_of_close_points_is_not_one_group():
    """Points along an arc, each within the threshold of the next but not of the one after: connected components
    made the arc one group and kept one point; dedup keeps every other point, and every dropped point is itself
    within the threshold of the kept point standing for it."""
    angles = np.arange(30) * 0.1  # neighbours at cos 0.995, two apart at cos 0.980
    x = np.zeros((30, 8), dtype=np.float32)
    x[:, 0], x[:, 1] = np.cos(angles), np.sin(angles)
    rep = near_duplicate_groups(x, threshold=0.99, center=False)
    kept = rep == np.arange(30)
    assert kept.sum() == 15 and kept[::2].all()
    assert kept[rep].all() and (np.einsum("ij,ij->i", x, x[rep]) >= 0.99 - 1e-6).all()


def _planted_uci_pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The UCI digits (raw pixels) with 60 exact and 60 lightly altered copies (5% brighter, pixel noise) of 120
    known images appended: the pool, the copies' rows and each copy's original."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    rng = np.random.default_rng(0)
    source = rng.choice(len(x), 120, replace=False)
    light = np.clip(x[source[60:]] * 1.05 + rng.normal(0, 0.3, size=(60, x.shape[1])), 0, 16)
    pool = np.concatenate([x, x[source[:60]], light]).astype(np.float32)
    return pool, np.arange(len(x), len(pool)), source


def test_planted_duplicates_in_a_real_pool_are_found_and_little_else():
    """The UCI digits (1,797 real 8x8 scans, raw pixels as the embedding) with 60 exact copies and 60 lightly
    altered copies (5% brighter, pixel noise) of known images appended: dedup at its default threshold drops the
    copies (recall), each for its own original, and few real images besides (precision)."""
    pool, planted, source = _planted_uci_pool()
    rep = near_duplicate_groups(pool, threshold=0.99)
    dropped = np.flatnonzero(rep != np.arange(len(pool)))
    found = np.isin(dropped, planted).sum()
    assert found / len(planted) >= 0.95 and found / len(dropped) >= 0.95  # measured: 1.0 and 0.992
    assert (rep[planted] == source).mean() >= 0.95


def test_look_alikes_of_a_crowded_class_are_not_near_duplicates():
    """A class the embedding crowds together (400 points within cos ~0.998 of each other, as a supervised model puts
    Fashion-MNIST's trousers) beside 1,200 spread points, and 60 planted copies (30 exact, 30 lightly moved): at the
    default settings dedup drops the copies, each for its own original, and none of the class. The threshold alone
    (0.99; dedup_relative=null, the old default) dropped 72% of the class."""
    from fmtransfer.curation.curate import CurationSettings, curate_embeddings

    rng = np.random.default_rng(0)
    centre = np.zeros(32)
    centre[0] = 6
    x = np.concatenate([rng.normal(size=(1200, 32)), centre + rng.normal(size=(400, 32)) * 0.04])
    source = rng.choice(len(x), 60, replace=False)
    moved = np.where(np.arange(60) < 30, 0.0, 1e-3)[:, None] * rng.normal(size=(60, 32))
    pool = np.concatenate([x, x[source] + moved]).astype(np.float32)
    quiet = {"seed": 0, "log": lambda *a: None}
    cur = curate_embeddings(pool, CurationSettings(levels=[20, 4]), **quiet)
    dropped = ~cur.kept
    assert not dropped[:1600].any() and dropped[1600:].all() and (cur.representative[1600:] == source).all()
    assert cur.dedup_stats["removed_at_threshold"] > 0.5 * 400  # what the threshold alone would have dropped
    plain = curate_embeddings(pool, CurationSettings(levels=[20, 4], dedup_relative=None), **quiet)
    assert (~plain.kept[1200:1600]).mean() > 0.5


def test_planted_duplicates_in_a_real_pool_are_found_by_the_ratio_test():
    """The real-pool planted copies of the test above, at the default dedup_relative (0.1): recall and precision
    stay (measured: 1.0 and 1.0), and every copy is matched to its own original."""
    from fmtransfer.curation.curate import CurationSettings
    from fmtransfer.curation.dedup import near_duplicates

    pool, planted, source = _planted_uci_pool()
    rep, _ = near_duplicates(pool, threshold=0.99, relative=CurationSettings().dedup_relative)
    dropped = np.flatnonzero(rep != np.arange(len(pool)))
    found = np.isin(dropped, planted).sum()
    assert found / len(planted) >= 0.98 and found / len(dropped) >= 0.98
    assert (rep[planted] == source).mean() >= 0.98
    for bad in (0, 1, 1.5):
        with pytest.raises(ConfigError, match=rf"curation.dedup_relative={bad}: .*\(0, 1\)"):
            CurationSettings(dedup_relative=bad)
        with pytest.raises(ConfigError, match=rf"curation.dedup_relative={bad}: .*\(0, 1\)"):
            near_duplicates(pool, relative=bad)


def test_a_quantile_threshold_reads_the_pool_s_own_scale():
    """dedup_quantile takes the threshold from the same neighbour search: that share of the points have a
    neighbour at or above it; exact copies set it at 1."""
    from fmtransfer.curation.dedup import near_duplicates

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    u = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -1)
    nearest = sims.max(1)
    rep, threshold = near_duplicates(x, quantile=0.05)
    assert np.mean(nearest >= threshold - 1e-6) == pytest.approx(0.05, abs=0.01)
    assert 0 < (rep != np.arange(500)).sum() <= 25  # each dropped point had a kept neighbour above the threshold
    y = np.concatenate([x, x[:10]])  # exact copies: their nearest similarity is 1
    rep, threshold = near_duplicates(y, quantile=0.01)
    assert threshold == pytest.approx(1.0, abs=1e-5) and set(np.flatnonzero(rep != np.arange(510))) == set(range(500, 510))
    for bad in (0, 1, 1.5):
        with pytest.raises(ConfigError, match=rf"curation.dedup_quantile={bad}: .*in \(0, 1\)"):
            near_duplicates(x, quantile=bad)
    for bad in (0, -0.5, 1.01):
        with pytest.raises(ConfigError, match=rf"curation.dedup_threshold={bad}: a cosine similarity in \(0, 1\]"):
            near_duplicate_groups(x, threshold=bad)


def test_dedup_inside_clusters_finds_the_same_groups():
    """Large pools are deduplicated inside k-means cells (SemDeDup); copies sit in their original's cell."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(6, 16)).astype(np.float32) * 5
    x = (centers[rng.integers(6, size=300)] + rng.normal(size=(300, 16))).astype(np.float32)
    copies = np.repeat(x[[5, 77, 140]], 4, axis=0) + rng.normal(size=(12, 16)).astype(np.float32) * 1e-3
    y = np.concatenate([x, copies])
    exact = near_duplicate_groups(y, threshold=0.999)
    cells = assign(y, centers)[0]
    assert (near_duplicate_groups(y, threshold=0.999, partition=cells, exact_up_to=10) == exact).all()
    assert (near_duplicate_groups(y, threshold=0.999, exact_up_to=10) == exact).all()  # cells computed inside
    # one cell of all 312 points, split by k-means into cells of at most 64 before the search
    assert (near_duplicate_groups(y, threshold=0.999, partition=np.zeros(len(y), int), exact_up_to=10,
                                  max_cell=64) == exact).all()
    assert set(exact[300:]) == {5, 77, 140} and int((exact == np.arange(len(y))).sum()) == 300
    with pytest.raises(DataError, match="partition"):
        near_duplicate_groups(y, partition=cells[:5], exact_up_to=10)


def test_bad_input_is_named():
    x, _ = skewed(big=50, small=2, per_small=5)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(DataError, match="row 7 holds NaN"):
        hierarchical_kmeans(bad, [4, 2])
    with pytest.raises(DataError, match="k=100 is larger than the number of points"):
        hierarchical_kmeans(x, [100, 2])
    with pytest.raises(DataError, match="decreasing"):
        hierarchical_kmeans(x, [4, 8])
    tree = hierarchical_kmeans(x, [4, 2], steps=1)
    with pytest.raises(DataError, match="target 100 is larger than the 60 points"):
        balanced_sample(tree, 100)
    from fmtransfer.curation.curate import CurationSettings, curate_embeddings

    settings = CurationSettings(target_size=10, levels=[4, 2], resampling_steps=1)
    with pytest.raises(DataError, match="the 60 embeddings are all the same row"):
        curate_embeddings(np.ones((60, 8), dtype=np.float32), settings, log=lambda *a: None)
    copies = np.concatenate([np.repeat(x[:1], 59, axis=0), x[1:2]])  # one image 59 times, and one other
    with pytest.raises(DataError, match=r"larger than the 2 samples left after dedup removed 58 of 60 at cosine "
                                        r"0.9900; raise curation.dedup_threshold"):
        curate_embeddings(copies, settings, log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"curation.balance_floor=1.5: .*\[0, 1\]"):
        CurationSettings(balance_floor=1.5)
    with pytest.raises(ConfigError, match=r"curation.dedup_threshold=0: a cosine similarity in \(0, 1\]"):
        CurationSettings(dedup_threshold=0)
