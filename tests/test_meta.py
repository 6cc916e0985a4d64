"""The checkpoint meta as one typed, versioned record (nanochat/checkpoint/meta.py): today's metas, written by the
real saver, and those of older versions parse; the record writes back the keys it read; a malformed meta is one
CheckpointError line. In-process, on real files.

tests/data/meta_3996eb6.json is a meta written by the trainer at commit 3996eb6 (before metas had a version), so
that older metas stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanochat import checkpoint
from nanochat.checkpoint import SCHEMA_VERSION, CheckpointError, Meta, Metric, file_name
from tests.helpers import save, states

OLD = Path(__file__).parent / "data" / "meta_3996eb6.json"


def read(directory: Path, step: int) -> dict:
    return json.loads((directory / file_name("meta", step)).read_text())


def test_a_meta_written_by_today_s_saver_parses_into_the_record(tmp_path: Path) -> None:
    save(tmp_path, 4, final=True)
    ckpt = checkpoint.inspect(tmp_path, 4)
    meta, raw = ckpt.meta, read(tmp_path, 4)
    assert ckpt.valid and isinstance(meta, Meta) and ckpt.final and not ckpt.weights_only
    assert raw["version"] == SCHEMA_VERSION == meta.version
    assert meta.step == 4 and meta.stop_reason == "periodic"
    assert sorted(meta.files) == [file_name("model", 4), file_name("optim", 4)]
    assert [r["loader"] for r in meta.ranks] == [{"offset": 4}]
    assert meta.to_dict() == raw and list(meta.to_dict()) == list(raw)  # the same keys, in the file's order
    assert meta == raw and meta["stop_reason"] == meta.stop_reason  # the read-only view of the JSON
    assert "snapshot" not in meta and "snapshot" not in raw  # a field that is unset is not written


def test_a_meta_from_before_the_version_field_parses_and_writes_back_its_keys() -> None:
    raw = json.loads(OLD.read_text())
    assert "version" not in raw
    meta = Meta.parse(raw)
    assert meta.version == 0 and meta.phase == "base_train" and meta.final and meta.step == 4
    assert meta.tokenizer == raw["tokenizer"] and meta.run_id == raw["run_id"] and meta.world_size == 1
    assert meta.metric("val_bpb") == Metric(raw["val_bpb"], 4) and meta.metric("val_pass@8") == Metric()
    assert meta.train_config["total_batch_size"] == meta.total_batch_size == 128
    assert meta.extra == {}  # every key of that version is a field
    assert list(meta.to_dict()) == ["version", *raw] and meta.to_dict() == {**raw, "version": SCHEMA_VERSION}


def test_the_oldest_meta_takes_the_defaults_of_the_fields_added_since(tmp_path: Path) -> None:
    """As the first trainer wrote it: no run id, phase, tokenizer, resume history or schedule extension, and crc32
    checksums (it still verifies: verify.py reads those)."""
    save(tmp_path, 4)
    raw = read(tmp_path, 4)
    gone = ("version", "run_id", "phase", "changed_on_resume", "schedule_extended", "tokens_seen")
    old = {k: v for k, v in raw.items() if k not in gone}
    for name in old["files"]:
        old["files"][name] = {"size": old["files"][name]["size"], "crc32": int(checkpoint.file_digest(
            tmp_path / name, "crc32"))}  # fmt: skip
    (tmp_path / file_name("meta", 4)).write_text(json.dumps(old))
    ckpt = checkpoint.inspect(tmp_path, 4, verify=True, load_check=False)
    assert ckpt.valid, ckpt.problem
    meta = ckpt.meta
    assert (meta.version, meta.phase, meta.run_id, meta.tokens_seen) == (0, "base_train", None, None)
    assert meta.changed_on_resume == [] and meta.schedule_extended is None and not meta.weights_only
    assert checkpoint.run_id(tmp_path / "elsewhere", ckpt) is None


def full() -> Meta:
    """A record with every field set, as a snapshot of an RL run that resumed and was slimmed could hold."""
    return Meta(
        step=8, files={file_name("model", 8): {"size": 3, "xxh3_64": "ab", "codec": "zstd"}}, tokenizer="f00d",
        source={"phase": "chat_sft", "dir": "/x", "step": 4, "model_xxh3_64": "cd"}, tasks="gsm8k:2", run_id="r1",
        phase="chat_rl", num_iterations=8, final=True, stop_reason="completed", model_config={"n_layer": 1},
        train_config={"seed": 0}, world_size=2, total_batch_size=512, tokens_seen=4096,
        changed_on_resume=[{"step": 4, "setting": "lr", "from": 1, "to": 2}],
        schedule_extended={"step": 4, "from_lrm": 0.5, "rewarm": 2},
        metrics={"val_pass@8": Metric(0.25, 8)}, train_loss=1.5, smooth_loss=0.5, train_time=2.0, started_at=1.0,
        torch_version="2.13", warnings=["slow disk"], ranks=[{"loader": {}, "rng": {}}] * 2, snapshot=True,
        checkpoint_dir="/y", weights_only=True, averaged_from=[{"step": 4}], saved_at=3.0,
        extra={"from_a_newer_writer": [1, 2]},
    )  # fmt: skip


def test_round_trip_keeps_every_field_and_unknown_keys() -> None:
    meta = full()
    d = meta.to_dict()
    assert d["val_pass@8"] == 0.25 and d["val_pass@8_step"] == 8 and d["from_a_newer_writer"] == [1, 2]
    back = Meta.parse(json.loads(json.dumps(d)))
    assert back == meta and back.to_dict() == d and list(back.to_dict()) == list(d)
    assert back.metrics == meta.metrics and back.extra == meta.extra and back.snapshot


def test_update_meta_keeps_a_newer_writer_s_keys_and_version(tmp_path: Path) -> None:
    save(tmp_path, 4)
    raw = read(tmp_path, 4)
    (tmp_path / file_name("meta", 4)).write_text(json.dumps({**raw, "version": 7, "future": {"x": 1}}))
    checkpoint.update_meta(tmp_path, 4, val_bpb=1.25, val_bpb_step=4)
    after = read(tmp_path, 4)
    assert after == {**raw, "version": 7, "future": {"x": 1}, "val_bpb": 1.25, "val_bpb_step": 4}
    assert checkpoint.inspect(tmp_path, 4).meta.metric("val_bpb") == Metric(1.25, 4)


def test_a_writer_s_record_becomes_the_same_file_as_its_dict(tmp_path: Path) -> None:
    """`checkpoint.write` takes the record or the dict it is parsed from (the trainer's one-line switch)."""
    record = {"run_id": "r", "phase": "base_train", "final": False, "val_bpb": None, "val_bpb_step": None}
    model, optim = states(1)
    for x in "ab":
        (tmp_path / x).mkdir()
    checkpoint.write(tmp_path / "a", 4, model, optim, record)
    checkpoint.write(tmp_path / "b", 4, model, optim, Meta.parse(record, committed=False))
    a, b = (read(tmp_path / x, 4) for x in "ab")
    assert a.pop("saved_at") and b.pop("saved_at") and a == b and a["val_bpb"] is None and a["version"] == 1


MALFORMED = {
    "not an object": ([], "TypeError"),
    "no step": ({"files": {}}, "KeyError: 'step'"),
    "step a string": ({"step": "4", "files": {}}, "TypeError: step is '4', not an integer"),
    "files a list": ({"step": 4, "files": []}, "AttributeError"),
    "final a string": ({"step": 4, "files": {}, "final": "yes"}, "TypeError: final is 'yes', not bool"),
    "ranks an object": ({"step": 4, "files": {}, "ranks": {}}, "TypeError: ranks is {}, not list"),
    "metric a string": ({"step": 4, "files": {}, "val_bpb": "low"}, "TypeError: val_bpb is 'low', not int or float"),
    "a bool step": ({"step": True, "files": {}}, "TypeError: step is True"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_meta_is_one_checkpoint_error_line(case: str) -> None:
    d, why = MALFORMED[case]
    with pytest.raises(CheckpointError) as e:
        Meta.parse(d, "meta_000004.json")
    message = str(e.value)
    assert message.startswith("meta_000004.json is unreadable (") and why in message and "\n" not in message


def test_inspect_reports_a_malformed_meta_as_the_checkpoint_s_problem(tmp_path: Path) -> None:
    save(tmp_path, 4)
    (tmp_path / file_name("meta", 4)).write_text(json.dumps({**read(tmp_path, 4), "ranks": "all"}))
    ckpt = checkpoint.inspect(tmp_path, 4)
    assert ckpt.committed and not ckpt.valid and ckpt.meta is None
    assert ckpt.problem == "meta_000004.json is unreadable (TypeError: ranks is 'all', not list)"
