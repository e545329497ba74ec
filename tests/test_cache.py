"""Cache entries: verified before use, rebuilt when damaged, built once by concurrent processes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, TINY, child_env, compose, run_cli

from softprompt.core import cache
from softprompt.core.errors import UserError

DAMAGED = "softprompt: cache entry {} was damaged ("


@pytest.fixture
def cold(tmp_path, monkeypatch) -> Path:
    """An empty softprompt cache for this test (in this process and in the children it starts)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(root))
    return root


def _notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("softprompt: ")]


# --- the entry API ---------------------------------------------------------------------------------


def _build_two_files(calls: list[str]):
    def build(staging: Path) -> None:
        calls.append("built")
        (staging / "a.json").write_text('{"rows": [1, 2, 3]}')
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    return build


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated file": (lambda d: _truncate(d / "a.json"), "a.json has 9 bytes, not 19"),
    "garbled, same size": (lambda d: _flip_byte(d / "sub" / "b.bin"), "sub/b.bin does not match its SHA-256"),
    "file missing": (lambda d: (d / "sub" / "b.bin").unlink(), "sub/b.bin is missing"),
    "marker missing": (lambda d: (d / cache.MANIFEST).unlink(), "no completeness marker"),
    "marker garbled": (lambda d: _truncate(d / cache.MANIFEST), "unreadable marker: JSONDecodeError"),
    "extra file": (lambda d: (d / "stray.tmp").write_text("x"), "unexpected file stray.tmp"),
}


def test_entry_is_built_once_then_read_without_building(cold):
    calls: list[str] = []
    path, built = cache.entry("things", "k1", _build_two_files(calls))
    assert (path, built, calls) == (cold / "things" / "k1", True, ["built"])
    marker = json.loads((path / cache.MANIFEST).read_text())
    assert marker["files"]["sub/b.bin"] == {"size": 1024, "mtime_ns": (path / "sub" / "b.bin").stat().st_mtime_ns,
                                            "sha256": hashlib.sha256(bytes(range(256)) * 4).hexdigest()}
    assert marker["files"]["a.json"]["size"] == 19
    assert cache.entry("things", "k1", _build_two_files(calls)) == (path, False)
    assert calls == ["built"]
    # nothing is left beside the entry but its lock file
    assert sorted(p.name for p in (cold / "things").iterdir()) == [".k1.lock", "k1"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_entry_is_rebuilt_with_one_notice(cold, capfd, damage):
    calls: list[str] = []
    path, _ = cache.entry("things", "k1", _build_two_files(calls))
    original = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != cache.MANIFEST}
    capfd.readouterr()
    inflict, reason = DAMAGES[damage]
    inflict(path)
    assert cache.entry("things", "k1", _build_two_files(calls)) == (path, True)
    err = capfd.readouterr().err
    assert _notices(err) == [f"softprompt: cache entry things/k1 was damaged ({reason}); rebuilding"], err
    assert calls == ["built", "built"]
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and p.name != cache.MANIFEST} == original
    assert cache.entry("things", "k1", _build_two_files(calls)) == (path, False)  # and now it is trusted


def test_killed_build_leaves_no_entry_and_its_staging_is_cleared(cold):
    def dies(staging: Path) -> None:
        (staging / "a.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.entry("things", "k1", dies)
    assert not (cold / "things" / "k1").exists()
    # a SIGKILL leaves the staging dir behind: the next build under the lock removes it
    (cold / "things" / ".staging-k1-abandoned").mkdir()
    calls: list[str] = []
    cache.entry("things", "k1", _build_two_files(calls))
    assert sorted(p.name for p in (cold / "things").iterdir()) == [".k1.lock", "k1"]


def test_full_disk_during_a_build_is_one_error_and_no_entry(cold):
    def fills_disk(staging: Path) -> None:
        (staging / "a.bin").write_bytes(b"x" * 2**20)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as info:
        cache.entry("things", "k1", fills_disk)
    message = str(info.value)
    assert message.startswith(f"no space left for cache entry things/k1 in {cold / 'things'} (1.0 MiB written, ")
    assert message.endswith(" MiB free); free some space or point SOFTPROMPT_CACHE to a larger disk")
    assert sorted(p.name for p in (cold / "things").iterdir()) == [".k1.lock"]
    assert cache.entry("things", "k1", _build_two_files([]))[1]  # space again: built


def test_unlockable_cache_is_one_error_but_complete_entries_still_read(cold):
    calls: list[str] = []
    path, _ = cache.entry("things", "k1", _build_two_files(calls))
    # stands in for a cache the user cannot write (the tests run as root, so no chmod)
    for name in ("k1", "k2"):
        (cold / "things" / f".{name}.lock").unlink(missing_ok=True)
        (cold / "things" / f".{name}.lock").mkdir()
    assert cache.entry("things", "k1", _build_two_files(calls)) == (path, False)
    with pytest.raises(UserError) as info:
        cache.entry("things", "k2", _build_two_files(calls))
    assert str(info.value).startswith(f"cannot lock cache entry things/k2 in {cold / 'things'} (")
    assert str(info.value).endswith("); make it writable or point SOFTPROMPT_CACHE to a writable directory")
    assert calls == ["built"]


def test_json_entry_with_an_unexpected_shape_is_recomputed(cold, capfd):
    value, hit = cache.json_entry("things", "j", lambda: [[1, 2]], check=lambda v: v)
    assert (value, hit) == ([[1, 2]], False)
    assert cache.json_entry("things", "j", lambda: pytest.fail("recomputed a good entry")) == ([[1, 2]], True)

    def needs_dict(v):
        return v["rows"]

    # verified bytes of another shape (written by another version): recomputed, not a traceback
    value, hit = cache.json_entry("things", "j", lambda: {"rows": [3]}, check=needs_dict)
    assert (value, hit) == ({"rows": [3]}, False)
    assert _notices(capfd.readouterr().err) == [
        "softprompt: cache entry things/j was damaged (TypeError reading it); rebuilding"]
    assert cache.json_entry("things", "j", lambda: pytest.fail("recomputed"), check=needs_dict) == ([3], True)


# --- each kind of entry softprompt writes ------------------------------------------------------------


def _only_entry(root: Path, kind: str, prefix: str = "") -> Path:
    found = [p for p in (root / kind).iterdir() if p.is_dir() and not p.name.startswith(".")
             and p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def test_tokenized_data_entry_damaged(cold, capfd):
    from softprompt.data.loading import tokenize
    from softprompt.models.tiny_tokenizer import tiny_tokenizer

    tok, _ = tiny_tokenizer(512)
    texts = ["I want you to act as a poet.", "Be yourself; everyone else is taken."]
    rows = tokenize(texts, tok, max_length=32, tokenizer_id="t")
    assert rows[0][-1] == tok.eos_token_id and len(rows) == 2
    entry = _only_entry(cold, "tokens")
    _truncate(entry / "value.json")  # half a JSON file: a JSONDecodeError before
    capfd.readouterr()
    assert tokenize(texts, tok, max_length=32, tokenizer_id="t") == rows
    assert _notices(capfd.readouterr().err) == [
        f"softprompt: cache entry tokens/{entry.name} was damaged (value.json has "
        f"{(entry / 'value.json').stat().st_size // 2} bytes, not {(entry / 'value.json').stat().st_size}); rebuilding"]


def test_tokenizer_entry_damaged(cold, capfd):
    from softprompt.models.tiny_tokenizer import tiny_tokenizer

    tok, path = tiny_tokenizer(512)
    text = "Act as a travel guide and suggest places to visit."
    ids = tok(text)["input_ids"]
    vocab = tok.get_vocab()
    _flip_byte(Path(path) / "tokenizer.json")
    capfd.readouterr()
    again, again_path = tiny_tokenizer(512)
    assert again_path == path
    assert _notices(capfd.readouterr().err) == [
        f"softprompt: cache entry tokenizers/{Path(path).name} was damaged "
        "(tokenizer.json does not match its SHA-256); rebuilding"]
    # retrained from the same samples: the same tokenizer as the cold run's
    assert again(text)["input_ids"] == ids and again.get_vocab() == vocab


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_tiny_model_entry_damaged(cold, capfd, file):
    import torch
    from safetensors.torch import load_file

    from softprompt.models.loading import load_model

    cfg = compose(TINY).model
    first = load_model(cfg)
    directory = Path(first.base_path)
    _truncate(directory / file)
    capfd.readouterr()
    second = load_model(cfg)
    assert second.base_path == first.base_path
    err = capfd.readouterr().err
    assert len(_notices(err)) == 1 and _notices(err)[0].startswith(DAMAGED.format(f"models/{directory.name}")), err
    assert f"{file} has " in err
    saved = load_file(directory / "model.safetensors")
    for name, tensor in first.model.state_dict().items():
        if name in saved:  # tied embeddings are stored once
            assert torch.equal(saved[name], tensor), name
    assert json.loads((directory / "config.json").read_text())["hidden_size"] == 64


def test_damaged_model_entry_named_by_path_is_one_error(cold):
    """scripts/generate.py and the demo load a tiny or converted base by its cache path: a damaged
    one cannot be rebuilt from there."""
    from softprompt.models.loading import load_model

    directory = Path(load_model(compose(TINY).model).base_path)
    cfg = compose(["model=bloomz-560m", f"model.name_or_path={directory}"]).model
    assert load_model(cfg).model.config.hidden_size == 64
    _flip_byte(directory / "model.safetensors")
    with pytest.raises(UserError) as info:
        load_model(cfg)
    assert str(info.value) == (
        f"cache entry {directory} is damaged (model.safetensors does not match its SHA-256); rerun the training "
        f"command that built it (it rebuilds the entry), or clear it with `rm -rf {directory}`")


def test_base_eval_entry_damaged(cold, capfd):
    from softprompt.evaluation.base_cache import cached_evaluation
    from softprompt.evaluation.evaluate import ModelEval
    from softprompt.evaluation.perplexity import PerplexityResult

    def compute() -> ModelEval:
        calls.append(1)
        return ModelEval(perplexity=PerplexityResult(perplexity=12.5, loss=2.5257, tokens=40),
                         generations=["a b", "c"], seconds=1.5)

    calls: list[int] = []
    first, hit = cached_evaluation("k" * 24, compute)
    assert not hit and calls == [1]
    entry = cold / "base_eval" / ("k" * 24)
    _truncate(entry / "value.json")
    capfd.readouterr()
    again, hit = cached_evaluation("k" * 24, compute)
    assert not hit and calls == [1, 1] and again == first
    assert _notices(capfd.readouterr().err)[0].startswith(DAMAGED.format("base_eval/" + "k" * 24))
    cached, hit = cached_evaluation("k" * 24, compute)
    assert hit and calls == [1, 1] and cached == first


def test_damaged_cache_run_rebuilds_and_matches_a_cold_run(cold, tmp_path):
    """One cold CLI run; then every kind of entry damaged at once; the next run rebuilds each with a
    notice and ends with the cold run's numbers."""
    args = TINY + ["training.max_steps=2", "eval.max_new_tokens=4", "eval.num_heldout_generations=1"]
    cold_run = run_cli(args + [f"hydra.run.dir={tmp_path / 'cold'}"])
    assert cold_run.returncode == 0, cold_run.stderr[-3000:]
    assert _notices(cold_run.stderr) == []
    cold_metrics = json.loads((tmp_path / "cold" / "metrics.json").read_text())
    assert cold_metrics["eval/base_cached"] == 0

    tokens = sorted(p for p in (cold / "tokens").iterdir() if not p.name.startswith("."))
    base_eval = _only_entry(cold, "base_eval")
    tokenizer = _only_entry(cold, "tokenizers")
    model = _only_entry(cold, "models", "tiny-llama-")
    _truncate(tokens[0] / "value.json")
    _truncate(base_eval / "value.json")
    _flip_byte(tokenizer / "tokenizer.json")
    _truncate(model / "model.safetensors")
    damaged_run = run_cli(args + [f"hydra.run.dir={tmp_path / 'damaged'}"])
    assert damaged_run.returncode == 0, damaged_run.stderr[-3000:]
    assert "Traceback" not in damaged_run.stderr
    notices = _notices(damaged_run.stderr)
    expected = [f"tokenizers/{tokenizer.name}", f"models/{model.name}", f"tokens/{tokens[0].name}",
                f"base_eval/{base_eval.name}"]
    assert [n.split(" was damaged")[0].removeprefix("softprompt: cache entry ") for n in notices] == expected, notices
    assert all(n.endswith("; rebuilding") for n in notices)
    metrics = json.loads((tmp_path / "damaged" / "metrics.json").read_text())
    assert metrics["eval/base_cached"] == 0  # recomputed, not read from half a file
    for key in ("eval/perplexity", "eval/base_perplexity", "eval/loss", "train/loss"):
        assert metrics[key] == pytest.approx(cold_metrics[key], rel=1e-6), key
    for entry in [*tokens, base_eval, tokenizer, model]:
        cache.verify(entry)  # all whole again


# --- the Hugging Face Hub cache ----------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _fake_hub_download(source: Path) -> tuple[str, Path]:
    """Lay `source`'s files out as huggingface_hub does for a download: content-addressed blobs
    (SHA-256 for LFS files, git SHA-1 for the others) and a snapshot of symlinks to them."""
    from huggingface_hub import constants

    repo_id = f"softprompt-test/tiny-{uuid.uuid4().hex[:8]}"
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(source.iterdir()):
        if file.name == cache.MANIFEST:
            continue
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)
    return repo_id, repo


@pytest.fixture
def hub_model(cold) -> tuple[str, Path]:
    from softprompt.models.loading import load_model

    return _fake_hub_download(Path(load_model(compose(TINY).model).base_path))


def test_intact_hub_download_is_checked_and_loads_offline(hub_model, capfd):
    from softprompt.models.loading import load_model

    repo_id, _ = hub_model
    capfd.readouterr()
    cache.check_hub_snapshot(repo_id, None, can_download=False)
    loaded = load_model(compose(["model=bloomz-560m", f"model.name_or_path={repo_id}"]).model)
    assert loaded.model.config.hidden_size == 64 and len(loaded.tokenizer) > 500
    assert _notices(capfd.readouterr().err) == []


def test_damaged_hub_download_offline_is_one_error_line(hub_model, tmp_path):
    repo_id, repo = hub_model
    weights = next((repo / "snapshots").glob("*/model.safetensors")).resolve()
    _flip_byte(weights)
    with pytest.raises(UserError) as info:
        cache.check_hub_snapshot(repo_id, None, can_download=False)
    assert str(info.value) == (
        f"cache entry for Hub model {repo_id!r} is damaged (model.safetensors does not match its SHA-256) and the "
        f"Hub is unreachable to download it again; connect and rerun, or clear it with `rm -rf {repo}`")
    result = run_cli(TINY + ["model=bloomz-560m", f"model.name_or_path={repo_id}",
                             f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {info.value}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_damaged_hub_download_online_is_removed_for_a_fresh_download(hub_model, capfd):
    repo_id, repo = hub_model
    link = next((repo / "snapshots").glob("*/config.json"))
    blob = link.resolve()
    _truncate(blob)
    capfd.readouterr()
    cache.check_hub_snapshot(repo_id, None, can_download=True)
    assert _notices(capfd.readouterr().err) == [
        f"softprompt: cache entry hub:{repo_id}/config.json was damaged (does not match its git SHA-1); "
        "downloading it again"]
    # what from_pretrained then fetches: the snapshot lacks the file, the bad blob is gone
    assert not link.is_symlink() and not blob.exists()
    assert (link.parent / "model.safetensors").is_file()


# --- concurrent processes ----------------------------------------------------------------------------

# Each child fills every kind of entry on the same cold cache. A hook on the commit step counts the
# builds and holds each one for a second, so that the other child surely arrives while it runs.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from hydra import compose, initialize_config_dir
    import softprompt.core.cache as cache
    from softprompt.core.config import CONF_DIR

    counter, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    commit = cache._commit
    def counted_commit(staging, target):
        with open(counter, "a") as f:
            f.write(f"{target.parent.name}/{target.name}\\n")
        time.sleep(1.0)
        commit(staging, target)
    cache._commit = counted_commit

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=json.loads(sys.argv[4]))
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.evaluation.base_cache import evaluate_base
    from softprompt.evaluation.evaluate import eval_prompts, train_subset
    from softprompt.models.loading import load_model

    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:  # start together
        time.sleep(0.02)
    loaded = load_model(cfg.model)
    splits = load_splits(cfg.dataset, cfg.seed)
    tid = f"tiny:{loaded.tokenizer_path}"
    val = tokenize(splits.validation, loaded.tokenizer, cfg.training.max_length, tid)
    train = tokenize(splits.train, loaded.tokenizer, cfg.training.max_length, tid)
    base, hit, _ = evaluate_base(loaded, val, train_subset(train, cfg.eval), eval_prompts(cfg.eval, splits.validation), cfg)
    print(json.dumps({"val": val, "train": train, "ppl": base.perplexity.perplexity,
                      "generations": base.generations, "model_dir": loaded.base_path,
                      "vocab": sorted(loaded.tokenizer.get_vocab().items())}))
""")


def test_two_processes_on_a_cold_cache_build_each_entry_once(cold, tmp_path):
    counter, barrier = tmp_path / "builds.txt", tmp_path / "barrier"
    barrier.mkdir()
    overrides = json.dumps(TINY + ["dataset.max_samples=16", "eval.max_new_tokens=4", "eval.num_heldout_generations=1"])
    # the children see this process's PYTHONPATH too (how the filelock floor in pyproject was tested)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(counter), str(barrier), name, overrides],
                                 cwd=ROOT, env=child_env({"SOFTPROMPT_CACHE": str(cold), "PYTHONPATH": pythonpath}),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in ("a", "b")]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err[-3000:]
        assert "damaged" not in err and "Traceback" not in err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    builds = counter.read_text().splitlines()
    # tokenizer, tiny model, two tokenizations, base evaluation: each built exactly once
    assert sorted(b.split("/")[0] for b in builds) == ["base_eval", "models", "tokenizers", "tokens", "tokens"]
    assert len(set(builds)) == len(builds)
    # the child that lost the race waited instead of building
    waits = sum(err.count("softprompt: waiting for cache entry") for _, err in outputs)
    assert waits >= 1, [err for _, err in outputs]
    for kind in ("tokenizers", "models", "tokens", "base_eval"):
        for entry in (cold / kind).iterdir():
            if not entry.name.startswith("."):
                cache.verify(entry)
        assert not [p for p in (cold / kind).iterdir() if p.name.startswith((".staging", ".trash"))]
    shutil.rmtree(barrier)


def _spy_on_hashing(monkeypatch) -> list[str]:
    """The names of the files cache.verify hashes from now on, in order."""
    hashed: list[str] = []
    real_digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p, *a: hashed.append(p.name) or real_digest(p, *a))
    return hashed


def _marker_after_files(marker) -> int:
    """Make the marker strictly newer than the entry's files (a loaded entry's state); its new mtime."""
    later = marker.stat().st_mtime_ns + 10_000_000
    os.utime(marker, ns=(later, later))
    return later


def test_unchanged_files_are_trusted_by_size_and_mtime_changed_ones_are_hashed(cold, monkeypatch):
    calls: list[str] = []
    path, _ = cache.entry("things", "k2", _build_two_files(calls))
    marker = path / cache.MANIFEST
    # the marker strictly newer than the files: the state a loaded model's entry is in later on
    later = _marker_after_files(marker)
    hashed = _spy_on_hashing(monkeypatch)
    cache.verify(path)
    assert hashed == []
    # same size, new bytes, new mtime (still older than the marker): hashed and found damaged
    _flip_byte(path / "sub" / "b.bin")
    stamp = later - 5_000_000
    os.utime(path / "sub" / "b.bin", ns=(stamp, stamp))
    with pytest.raises(cache.Damaged, match="sub/b.bin does not match its SHA-256"):
        cache.verify(path)
    assert hashed == ["b.bin"]


def test_file_as_new_as_its_marker_is_hashed_even_with_the_recorded_mtime(cold, monkeypatch):
    """Racily clean: a write in the marker's own clock tick could leave the mtime unchanged."""
    path, _ = cache.entry("things", "k3", _build_two_files([]))
    recorded = json.loads((path / cache.MANIFEST).read_text())["files"]["a.json"]["mtime_ns"]
    marker_mtime = (path / cache.MANIFEST).stat().st_mtime_ns
    os.utime(path / cache.MANIFEST, ns=(recorded, recorded))
    _flip_byte(path / "a.json")
    os.utime(path / "a.json", ns=(recorded, recorded))
    with pytest.raises(cache.Damaged, match="a.json does not match its SHA-256"):
        cache.verify(path)
    assert marker_mtime >= recorded


def test_a_marker_without_mtimes_gets_them_after_one_full_check(cold, monkeypatch):
    """Entries built before markers recorded mtimes were hashed whole on every load (SmolLM2's
    513 MiB: ~0.56 s each run); one intact full check records them, later checks trust them."""
    path, _ = cache.entry("things", "k4", _build_two_files([]))
    marker = path / cache.MANIFEST
    old = json.loads(marker.read_text())
    for record in old["files"].values():
        del record["mtime_ns"]  # the marker format as an older softprompt wrote it
    marker.write_text(json.dumps(old, indent=1))
    later = _marker_after_files(marker)
    hashed = _spy_on_hashing(monkeypatch)
    cache.verify(path)
    assert sorted(hashed) == ["a.json", "b.bin"]
    files = json.loads(marker.read_text())["files"]
    assert files["sub/b.bin"]["mtime_ns"] == (path / "sub" / "b.bin").stat().st_mtime_ns
    assert files["sub/b.bin"]["sha256"] == old["files"]["sub/b.bin"]["sha256"]
    # nothing left beside the entry or in it but what the marker lists
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == ["k4"]
    hashed.clear()
    cache.verify(path)
    assert hashed == []
    # a file changed since is still found: its new mtime is not the recorded one
    _flip_byte(path / "sub" / "b.bin")
    with pytest.raises(cache.Damaged, match="sub/b.bin does not match its SHA-256"):
        cache.verify(path)


def test_a_busy_entry_keeps_its_marker_and_still_verifies(cold):
    from filelock import FileLock

    path, _ = cache.entry("things", "k5", _build_two_files([]))
    marker = path / cache.MANIFEST
    old = json.loads(marker.read_text())
    for record in old["files"].values():
        del record["mtime_ns"]
    marker.write_text(json.dumps(old, indent=1))
    with FileLock(str(path.parent / ".k5.lock")):  # another process rebuilding or recording it
        cache.verify(path)
    assert json.loads(marker.read_text()) == old
