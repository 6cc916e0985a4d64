"""nanochat/compress.py: lossless round trips of model and optimizer states, exact resume from a compressed
optimizer state, the "none" passthrough, and clear errors for damaged files. In-process and fast."""

from __future__ import annotations

import io
import json
import math
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from nanochat import compress
from nanochat.compress import CompressedFileError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import OptimConfig, Optimizers
from tests.helpers import FORGED, forged


def same(a, b, where: str = "/") -> None:
    """a and b are the same state: same types, keys in the same order, tensors bit for bit (NaN and -0.0 too)."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.contiguous().reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], where
        for k in a:
            same(a[k], b[k], f"{where}{k}/")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}{i}/")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert a == b, where


def roundtrip(state, tmp_path: Path, threads: int = 2, name: str = "state.pt", **kw):
    path = tmp_path / name
    with open(path, "wb") as f:
        info = compress.dump(state, f, threads=threads, **kw)
    assert compress.codec_of(path) == info["codec"]
    return compress.load(path, threads=threads), path


def model_like() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 300, generator=g)
    return OrderedDict(
        [
            ("wte.weight", torch.randn(50, 16, generator=g)),
            ("bf16", torch.randn(7, 33, generator=g).to(torch.bfloat16)),
            ("fp16", torch.randn(5, generator=g).half()),
            ("fp64", torch.randn(3, 3, generator=g, dtype=torch.float64)),
            ("int64", torch.randint(-(2**62), 2**62, (17,), generator=g)),
            ("int8", torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8)),
            ("bool", torch.rand(11, generator=g) > 0.5),
            ("scalar", torch.tensor(3.5)),
            ("scalar_int", torch.tensor(7)),
            ("empty", torch.empty(0, 5)),
            ("transposed", big.t()),  # non-contiguous views of one storage
            ("strided", big[::3, 1::2]),
            ("special", torch.tensor([math.nan, -0.0, math.inf, -math.inf, 1e-45, 3.4e38])),
        ]
    )


def test_model_state_round_trip_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(compress, "CHUNK_BYTES", 1000)  # many chunks per tensor, a partial last one
    state = model_like()
    back, _ = roundtrip(state, tmp_path)
    same(state, back)
    assert all(t.is_contiguous() for t in back.values())


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip_options(tmp_path, monkeypatch, group, threads):
    monkeypatch.setattr(compress, "CHUNK_BYTES", 512)
    state = model_like()
    back, _ = roundtrip(state, tmp_path, threads=threads, group=group, level=3)
    same(state, back)


def test_plain_values_and_structure_round_trip(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.ones(3)}, 7: {}},
        "param_groups": [
            {"lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-10, "fused": None, "foreach": False, "params": [0, 7]},
        ],
        "nested": [[1, [2.5, "x"]], (None, (True,)), {"k": [], "e": ()}, {}],
        "floats": [math.nan, -0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 0.1],
        "ints": [0, -1, 2**63 + 12345, -(2**80)],
        "text": 'ünïcode\n"quoted"\x00',
        None: "a None key",
        2.5: "a float key",
        ("a", 1): "a tuple key",
        True: False,
    }
    back, _ = roundtrip(state, tmp_path)
    same(state, back)


@pytest.mark.parametrize(
    "state", [{}, [], None, torch.arange(5), [torch.empty(0)], {"c": torch.ones(2, dtype=torch.complex64)}]
)
def test_any_top_level(tmp_path, state):
    back, path = roundtrip(state, tmp_path)
    same(state, back)
    assert compress.read_index(path)["codec"] == "zstd"


def test_optimizer_state_resumes_bit_identical(tmp_path):
    """A real trainer state (AdamW + Muon) saved compressed, loaded into fresh optimizers: the next steps match."""

    def make() -> tuple[GPT, Optimizers]:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_depth(1, 64, 16, head_dim=16))
        model.init_weights(0)
        return model, Optimizers(model, OptimConfig())

    def step(model: GPT, opt: Optimizers, seed: int) -> None:
        x = torch.randint(64, (2, 17), generator=torch.Generator().manual_seed(seed))
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step(1.0, 0.9)
        opt.zero_grad()

    model, opt = make()
    for s in range(2):
        step(model, opt, s)
    saved_model, _ = roundtrip(model.state_dict(), tmp_path, name="model.pt")
    saved_optim, _ = roundtrip(opt.state_dict(), tmp_path, name="optim.pt")
    same(opt.state_dict(), saved_optim)
    resumed, ropt = make()
    resumed.load_state_dict(saved_model)
    ropt.load_state_dict(saved_optim)
    for s in range(2, 4):
        step(model, opt, s)
        step(resumed, ropt, s)
    same(model.state_dict(), resumed.state_dict())
    same(opt.state_dict(), ropt.state_dict())


def test_output_does_not_depend_on_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(compress, "CHUNK_BYTES", 700)
    outs = []
    for threads in (1, 4):
        buf = io.BytesIO()
        compress.dump(model_like(), buf, threads=threads)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_none_is_plain_torch_save(tmp_path):
    state = model_like()
    back, path = roundtrip(state, tmp_path, codec="none")
    assert compress.codec_of(path) == "none"
    same(dict(state), back)
    torch_file = tmp_path / "torch.pt"
    torch.save(state, torch_file)
    assert torch.load(path, weights_only=True).keys() == state.keys()  # a torch.save file, as before
    same(dict(state), compress.load(torch_file, mmap=True))
    with open(tmp_path / "z.pt", "wb") as f:  # a torch.save file recompressed, e.g. for an upload
        info = compress.dump(compress.load(torch_file, mmap=True), f, "zstd")
    assert info["raw_size"] == sum(t.numel() * t.element_size() for t in state.values())
    same(dict(state), compress.load(tmp_path / "z.pt"))


def test_what_cannot_be_saved(tmp_path):
    with pytest.raises(TypeError, match=r"cannot compress a set at /a/b"):
        compress.dump({"a": {"b": {1}}}, io.BytesIO())
    with pytest.raises(ValueError, match="unknown codec 'lz5'"):
        compress.dump({}, io.BytesIO(), codec="lz5")


def written(tmp_path: Path) -> tuple[Path, bytes, int]:
    """A compressed file of a few chunks: (path, its bytes, where its index starts)."""
    path = tmp_path / "good.pt"
    with open(path, "wb") as f:
        compress.dump(model_like(), f, threads=1)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[-16:-8])
    return path, data, len(data) - 16 - n


def damaged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "damaged.pt"
    path.write_bytes(data)
    return path


def test_truncated_files_are_clear_errors(tmp_path):
    _, data, _ = written(tmp_path)
    for n in sorted({0, 3, 8, 9, 100, len(data) // 2, len(data) - 17, len(data) - 16, len(data) - 1}):
        path = damaged(tmp_path, data[:n])
        with pytest.raises(CompressedFileError, match=r"damaged\.pt (is|has)"):
            compress.read_index(path)
        if n >= 8:  # a prefix with the magic is still recognised as compressed, and refused
            assert compress.codec_of(path) == "zstd"
            with pytest.raises(CompressedFileError):
                compress.load(path)


def test_corrupted_frames_never_load_wrong_data(tmp_path):
    _, data, start = written(tmp_path)
    state = model_like()
    for pos in range(8, start, max(1, (start - 8) // 60)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        try:
            back = compress.load(damaged(tmp_path, bytes(bad)), threads=2)
        except CompressedFileError as e:
            assert "damaged.pt is corrupted" in str(e) and "\n" not in str(e)
        else:  # only a flip zstd ignores (an unused header bit) may load, and then the data is intact
            same(state, back)


@pytest.mark.parametrize(
    "edit",
    [
        lambda ix: ix.update(format=2),
        lambda ix: ix["tensors"][0].update(dtype="nn"),  # an attribute of torch that is not a dtype
        lambda ix: ix["tensors"][0].update(shape=[-1, 16]),
        lambda ix: ix["tensors"][0].update(group=3),
        lambda ix: ix["tensors"][0]["chunks"][0].__setitem__(0, 12),
        lambda ix: ix["tensors"][0]["chunks"][0].append(1),
        lambda ix: ix["tensors"].pop(),
        lambda ix: ix.update(tree={"tensor": 99}),
        lambda ix: ix.update(tree={"module": "os"}),
        lambda ix: ix.update(tree={"dict": [[[1], 2]]}),  # an unhashable key
        lambda ix: ix.pop("tensors"),
    ],
)
def test_malformed_index_is_a_clear_error(tmp_path, edit):
    _, data, start = written(tmp_path)
    index = json.loads(data[start:-16])
    edit(index)
    raw = json.dumps(index).encode()
    path = damaged(tmp_path, data[:start] + raw + struct.pack("<Q", len(raw)) + data[-8:])
    with pytest.raises(CompressedFileError, match=r"damaged\.pt has a malformed index"):
        compress.load(path)


def test_garbage_and_missing_files(tmp_path):
    _, data, start = written(tmp_path)
    path = damaged(tmp_path, data[:start] + b"{not json" + struct.pack("<Q", 9) + data[-8:])
    with pytest.raises(CompressedFileError, match="malformed index"):
        compress.read_index(path)
    with pytest.raises(CompressedFileError, match="not a compressed checkpoint"):
        compress.read_index(damaged(tmp_path, b"PK\x03\x04" + bytes(100)))
    with pytest.raises(FileNotFoundError):  # storage errors stay OSError
        compress.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", FORGED)
def test_forged_containers_are_malformed_before_anything_is_allocated(tmp_path, kind):
    """Every declared size is exact and bounded by the file's size: a forged index fails in read_index (which
    verification uses) as a CompressedFileError, never as a RuntimeError at load or a 512 MiB allocation."""
    data = forged(kind)
    assert len(data) < 20_000
    path = damaged(tmp_path, data)
    with pytest.raises(CompressedFileError, match=r"damaged\.pt (is|has)") as e:
        compress.read_index(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CompressedFileError):
        compress.load(path, threads=1)


def test_declared_sizes_are_bounded_by_the_file_and_the_caller(tmp_path):
    """A real file of zeros (the best case for zstd) loads under the floor; a caller's `max_raw` bounds more."""
    back, path = roundtrip({"z": torch.zeros(1 << 20)}, tmp_path)
    assert path.stat().st_size * compress.MAX_RATIO < 4 << 20 and back["z"].count_nonzero() == 0
    with pytest.raises(CompressedFileError, match=r"state\.pt has a malformed index .*declares over 4194304 bytes"):
        compress.read_index(path, max_raw=(4 << 20) - 1)
    with pytest.raises(CompressedFileError, match="declares over"):
        compress.load(path, max_raw=1 << 20)
