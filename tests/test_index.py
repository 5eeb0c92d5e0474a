"""The collection index (read once, incremental, atomic), sub-quadratic near-duplicates, the group-size cap,
the RAM-cache budget and the DDP agreement checks."""
import errno
import os
import socket
import warnings

import cv2
import numpy as np
import pytest

from mineralnet import data as mdata
from mineralnet.data import index as mindex
from mineralnet.data.duplicates import group_duplicates, near_duplicate_pairs
from mineralnet.errors import MineralNetError


def _photo(path, seed: int, size=(48, 64)):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), size[::-1], interpolation=cv2.INTER_CUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def _collection(root, per_class=6, classes=("calcite", "quartz")):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _photo(root / name / f"{i}.jpg", 100 * c + i)
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts the files the index reads."""
    seen = []
    real = mindex.index_photo

    def spy(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(mindex, "index_photo", spy)
    return seen


def test_index_is_built_once_and_refreshed_incrementally(tmp_path, counted):
    root = _collection(tmp_path / "photos")
    index_file = tmp_path / "idx.npz"
    first = mdata.scan_dataset(root, index_file=index_file)
    assert len(counted) == 12 and index_file.is_file()
    counted.clear()
    again = mdata.scan_dataset(root, index_file=index_file)
    assert counted == []  # nothing re-read
    assert again.samples == first.samples
    assert (again.facts.phash == first.facts.phash).all() and (again.facts.digest == first.facts.digest).all()
    _photo(root / "quartz" / "new.jpg", 999)  # added
    os.remove(root / "calcite" / "0.jpg")  # removed
    changed = root / "calcite" / "1.jpg"
    _photo(changed, 555, size=(40, 70))  # changed: another size on disk
    counted.clear()
    third = mdata.scan_dataset(root, index_file=index_file)
    assert sorted(os.path.basename(p) for p in counted) == ["1.jpg", "new.jpg"]
    assert len(third.samples) == 12
    saved = mindex.load_index(index_file)
    assert "calcite/0.jpg" not in saved.rel and "quartz/new.jpg" in saved.rel
    row = saved.rel.index("calcite/1.jpg")
    assert (saved.width[row], saved.height[row]) == (70, 40)


def test_index_facts_match_an_independent_computation(tmp_path):
    import hashlib

    root = _collection(tmp_path / "photos", per_class=3)
    index = mdata.scan_dataset(root, index_file=tmp_path / "i.npz")
    for (path, _), digest, phash in zip(index.samples, index.facts.digest, index.facts.phash):
        assert bytes(digest) == hashlib.sha256(open(path, "rb").read()).digest()[:16]
        # a 64x48 photo is decoded in full either way, so the hash equals the hash of the whole decode
        assert (np.unpackbits(phash).astype(bool) == mdata.photo_hash(mdata.load_image(path))).all()


def test_a_photo_truncated_after_indexing_is_read_again_and_reported(tmp_path):
    root = _collection(tmp_path / "photos", per_class=3)
    idx = tmp_path / "i.npz"
    mdata.scan_dataset(root, index_file=idx)
    victim = root / "quartz" / "2.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    index = mdata.scan_dataset(root, index_file=idx)
    assert [os.path.basename(p) for p, _ in index.bad] == ["2.jpg"]
    assert "truncated" in index.bad[0][1].lower()
    assert len(index.samples) == 5


def test_a_corrupt_or_old_index_is_rebuilt_with_one_warning(tmp_path, counted):
    root = _collection(tmp_path / "photos", per_class=2)
    idx = tmp_path / "i.npz"
    idx.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.warns(UserWarning, match="cannot read the collection index"):
        mdata.scan_dataset(root, index_file=idx)
    assert len(counted) == 4 and mindex.load_index(idx).rel  # rebuilt
    np.savez(idx, format=np.array("mineralnet-index/0"))
    with pytest.warns(UserWarning, match="another MineralNet version"):
        mdata.scan_dataset(root, index_file=idx)


def test_another_collections_index_is_refused_not_overwritten(tmp_path):
    a, b = _collection(tmp_path / "a", per_class=2), _collection(tmp_path / "b", per_class=2)
    idx = tmp_path / "i.npz"
    mdata.scan_dataset(a, index_file=idx)
    before = idx.read_bytes()
    with pytest.raises(MineralNetError, match="indexes .* not .*pass another --index"):
        mdata.scan_dataset(b, index_file=idx)
    assert idx.read_bytes() == before


def test_a_full_disk_leaves_the_old_index_and_the_run_goes_on(tmp_path, monkeypatch):
    root = _collection(tmp_path / "photos", per_class=2)
    idx = tmp_path / "i.npz"
    mdata.scan_dataset(root, index_file=idx)
    before = idx.read_bytes()
    _photo(root / "quartz" / "more.jpg", 77)

    def full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.warns(UserWarning, match="could not write the collection index .*No space left"):
        index = mdata.scan_dataset(root, index_file=idx)
    assert len(index.samples) == 5
    assert idx.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_default_index_lives_in_the_cache_keyed_by_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINERALNET_CACHE", str(tmp_path / "cache"))
    root = _collection(tmp_path / "photos", per_class=2)
    mdata.scan_dataset(root)
    path = mdata.default_index_path(root)
    assert path.is_file() and path.parent == tmp_path / "cache" / "index"
    assert mdata.default_index_path(tmp_path / "other") != path


# ---- near-duplicates -----------------------------------------------------------------------------------

def _planted(n, rng, flips=(2, 8, 12, 16), copies=150):
    h = rng.integers(0, 2, (n, 128)).astype(bool)
    rows, truth = [h], {}
    for d in flips:
        for i in rng.choice(n, copies, replace=False):
            c = h[i].copy()
            c[rng.choice(128, d, replace=False)] ^= True
            rows.append(c[None])
            truth[(int(i), n + len(truth))] = d
    return np.concatenate(rows), truth


def test_banded_pairs_are_exact_where_found_and_find_nearly_all():
    rng = np.random.default_rng(1)
    hashes, truth = _planted(3000, rng)
    exact = near_duplicate_pairs(hashes, 20, exact=True)
    banded = near_duplicate_pairs(hashes, 20, exact=False)
    # independent distance: count differing booleans
    for i, j, d in banded:
        assert d == int((hashes[i] != hashes[j]).sum()) <= 20
    assert set(banded) <= set(exact)
    found = {(i, j) for i, j, _ in banded}
    for d in (2, 8, 12):
        assert all(k in found for k, v in truth.items() if v == d)
    at16 = [k in found for k, v in truth.items() if v == 16]
    assert np.mean(at16) >= 0.95
    assert len(banded) >= 0.97 * len(exact)


def test_exact_pairs_match_a_python_loop():
    rng = np.random.default_rng(2)
    hashes, _ = _planted(60, rng, flips=(3, 19, 21), copies=5)
    want = sorted((i, j, int((hashes[i] != hashes[j]).sum())) for i in range(len(hashes))
                  for j in range(i + 1, len(hashes)) if (hashes[i] != hashes[j]).sum() <= 20)
    assert near_duplicate_pairs(hashes, 20) == want


def test_a_giant_group_of_look_alikes_is_dissolved_but_copies_stay_together():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, 128).astype(bool)
    chain = [base]
    for _ in range(119):  # each photo 6 bits from the previous one: one connected chain of 120
        c = chain[-1].copy()
        c[rng.choice(128, 6, replace=False)] ^= True
        chain.append(c)
    loners = rng.integers(0, 2, (40, 128)).astype(bool)
    hashes = np.concatenate([np.stack(chain), loners, np.stack([chain[5]])])  # + a byte-identical copy of #5
    digests = [bytes([i % 256, i // 256]) for i in range(len(hashes) - 1)] + [bytes([5, 0])]
    groups = group_duplicates(hashes, digests, 20, max_group=50)
    assert len(groups.oversized) == 1 and len(groups.oversized[0]) == 121
    assert groups.ids[5] == groups.ids[-1]  # the copy still travels with its photo
    sizes = np.bincount(groups.ids)
    assert sizes.max() == 2
    raised = group_duplicates(hashes, digests, 20, max_group=200)
    assert raised.oversized == [] and np.bincount(raised.ids).max() == 121
    note = groups.oversized_note([f"p{i}.jpg" for i in range(len(hashes))], 50)
    assert "121 photos" in note and "p0.jpg" in note and "--max-duplicate-group" in note


def test_look_alike_collection_keeps_its_training_share():
    rng = np.random.default_rng(4)
    n = 400
    base = rng.integers(0, 2, 128).astype(bool)
    hashes = np.stack([base ^ (rng.random(128) < 0.05) for _ in range(n)])  # all within ~13 bits of each other
    labels = [i % 4 for i in range(n)]
    merged_all = group_duplicates(hashes, None, 20, max_group=10**6)
    tr, _ = mdata.stratified_split(labels, 0.1, groups=merged_all.ids)
    assert len(tr) < 0.5 * n  # the old behaviour: one giant group, all of it in one place
    capped = group_duplicates(hashes, None, 20)
    tr, va = mdata.stratified_split(labels, 0.1, groups=capped.ids)
    assert len(tr) >= 0.85 * n and len(va) >= 0.05 * n


def test_false_partner_note_scales_with_the_collection():
    assert "0.51 false partner" in mdata.false_partner_note(100_001, 20)
    assert "not measured" in mdata.false_partner_note(10, 30)


# ---- memory budget --------------------------------------------------------------------------------------

def test_cache_budget_caches_a_prefix_and_the_rest_reads_from_disk(tmp_path):
    root = _collection(tmp_path / "photos", per_class=4)
    samples = mdata.scan_dataset(root, index_file=tmp_path / "i.npz").samples
    tf = mdata.build_transforms(32, [0.5] * 3, [0.25] * 3, train=False, resize=36)
    full = mdata.PhotoDataset(samples, tf, cache_side=45)
    one = full.cache[0].nbytes
    part = mdata.PhotoDataset(samples, tf, cache_side=45, cache_bytes=3 * one)
    assert full.cached == 8 and part.cached == 3
    for i in range(8):
        assert np.array_equal(part[i][0].numpy(), full[i][0].numpy())
    canvas = mdata.CanvasDataset(samples, 40, cache_bytes=2 * 40 * 40 * 3 + 5)
    assert canvas.cached == 2 and len(canvas) == 8
    assert np.array_equal(canvas[5][0].pixels.numpy(), mdata.CanvasDataset(samples, 40, cache=False)[5][0].pixels.numpy())


def test_config_refuses_bad_budget_and_group_bound():
    from mineralnet.config import load_config

    with pytest.raises(MineralNetError) as e:
        load_config("base", max_duplicate_group=1, cache_budget_gb=-1).validate()
    assert "--max-duplicate-group 1" in str(e.value) and "--cache-budget-gb -1" in str(e.value)


# ---- DDP: ranks share the reading and must see the same photos -----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, roots, index_file, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import PartialState

    from mineralnet.train.inputs import RankExchange

    seen = []
    real = mindex.index_photo
    mindex.index_photo = lambda p: (seen.append(p), real(p))[1]
    state = PartialState(cpu=True)
    try:
        index = mdata.scan_dataset(roots[rank], index_file=index_file, exchange=RankExchange(state))
        result = ("ok", len(seen), len(index.samples), index.facts.digest.tobytes())
    except MineralNetError as e:
        result = ("error", str(e))
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(result))
    state.destroy_process_group() if hasattr(state, "destroy_process_group") else None


def _run_ranks(roots, index_file, out):
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, _free_port(), roots, str(index_file), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    import ast

    return [ast.literal_eval(open(f"{out}.{r}").read()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_read_each_photo_once_and_stop_together_on_different_files(tmp_path):
    root = _collection(tmp_path / "photos", per_class=5)
    r0, r1 = _run_ranks([str(root), str(root)], tmp_path / "i.npz", tmp_path / "res")
    assert r0[0] == r1[0] == "ok"
    assert r0[1] + r1[1] == 10 and r0[1] == r1[1] == 5  # each photo decoded once in total
    assert r0[2] == r1[2] == 10 and r0[3] == r1[3]  # both ranks hold the same index
    other = _collection(tmp_path / "copy", per_class=5)
    _photo(other / "quartz" / "extra.jpg", 31)
    r0, r1 = _run_ranks([str(root), str(other)], tmp_path / "j.npz", tmp_path / "res2")
    assert r0[0] == r1[0] == "error"
    assert "ranks see different photos" in r0[1] and "only by rank" in r0[1]
    warnings.simplefilter("ignore")
