"""Data shards, tokenizer and data loader, all on real files (the session corpus from conftest or tiny ones)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.dataset import (
    DownloadError,
    data_dir,
    download_shards,
    iter_texts,
    list_shards,
    train_val_shards,
    write_builtin_corpus,
)
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer, tokenizer_dir
from tests.conftest import REPO_ROOT, TEST_DOCS, TEST_SHARDS

# ---- helpers -----------------------------------------------------------------------------------------------


def write_tiny_shards(directory: Path, shards: int = 3, groups: int = 2, docs: int = 4) -> None:
    """Small shards whose documents carry a unique tag `doc-S-G-I` and vary in length."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for s in range(shards):
        texts = [
            f"doc-{s}-{g}-{i} " + " ".join(rng.choice(["import", "def", "x = 1", "ünï", "é", "\n"]) for _ in range(8))
            for g in range(groups)
            for i in range(docs)
        ]
        pq.write_table(pa.table({"text": texts}), directory / f"shard_{s:05d}.parquet", row_group_size=docs)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    write_tiny_shards(tmp_path / "tiny")
    return tmp_path / "tiny"


def expected_stream(tok: Tokenizer, loader: DataLoader, epochs: int) -> list[int]:
    """The token stream the spec prescribes for loader's rank: [BOS] + doc over units in per-epoch order."""
    out: list[int] = []
    for epoch in range(epochs):
        order = list(range(len(loader.units)))
        if loader.split == "train":
            random.Random(loader.seed * 1000003 + epoch).shuffle(order)
        for k in order:
            shard, rg = loader.units[k]
            texts = pq.ParquetFile(shard).read_row_group(rg).column("text").to_pylist()
            for ids in tok.encode_batch(texts):
                out += [tok.bos_id, *ids]
    return out


def batches(loader: DataLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode != 0, f"expected failure, got rc=0: {proc.stdout}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, f"error is not one line: {err!r}"
    assert needle in err, err


# ---- dataset -----------------------------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic(tmp_path: Path) -> None:
    a = write_builtin_corpus(tmp_path / "a", num_shards=2, max_docs=40, seed=3, docs_per_row_group=8)
    b = write_builtin_corpus(tmp_path / "b", num_shards=2, max_docs=40, seed=3, docs_per_row_group=8)
    c = write_builtin_corpus(tmp_path / "c", num_shards=2, max_docs=40, seed=4, docs_per_row_group=8)
    assert [p.name for p in a] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    meta = pq.ParquetFile(a[0]).metadata
    assert meta.num_rows == 20 and meta.num_row_groups == 3  # 8 + 8 + 4
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == [p.name for p in a]  # no temp files left
    texts = list(iter_texts(a))
    assert len(texts) == 40 and all(0 < len(t) <= 70_000 for t in texts)


def test_builtin_corpus_refuses_stale_extra_shards(tmp_path: Path) -> None:
    write_builtin_corpus(tmp_path, num_shards=3, max_docs=6)
    with pytest.raises(ValueError, match="shard_00002.parquet"):
        write_builtin_corpus(tmp_path, num_shards=2, max_docs=6)


def test_shards_and_val_split(base_dir: Path) -> None:
    shards = list_shards(data_dir(base_dir))
    assert [p.name for p in shards] == [f"shard_{i:05d}.parquet" for i in range(TEST_SHARDS)]
    train, val = train_val_shards(data_dir(base_dir))
    assert train == shards[:-1] and val == shards[-1]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in shards) == TEST_DOCS
    assert list_shards() == shards  # the default directory follows NANOCHAT_BASE_DIR


def test_list_shards_ignores_temp_and_other_files(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, shards=2)
    for name in (".shard_00002.parquet.1a2b.tmp", "shard_00003.parquet.tmp", "shard_7.parquet", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in list_shards(tmp_path)] == ["shard_00000.parquet", "shard_00001.parquet"]


def test_iter_texts_respects_max_chars(base_dir: Path) -> None:
    train, _ = train_val_shards(data_dir(base_dir))
    assert sum(len(t) for t in iter_texts(train, max_chars=12_345)) == 12_345


def test_missing_data_error_names_dir_and_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        train_val_shards(tmp_path / "nothing")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nothing") in msg
    assert "python -m nanochat.dataset --builtin" in msg and "python -m nanochat.dataset -n 8" in msg
    write_tiny_shards(tmp_path, shards=1)
    with pytest.raises(FileNotFoundError, match="only 1 data shard"):
        train_val_shards(tmp_path)


# ---- tokenizer ---------------------------------------------------------------------------------------------

SAMPLES = [
    "Hello, world! It's 2024; we're testing 1234567 numbers.",
    "héllo wörld — naïve café, 日本語のテキスト, 한국어, עברית, العربية, emoji 🎉👩‍👩‍👧 and \u0301 combining",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\r\n\n\n    pass\x00\x7f",
    "<|bos|> is only text here",
    "",
    "   leading and trailing spaces   ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_id not in ids  # BOS is only ever inserted by code, never produced from text
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_round_trip_random_unicode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    points = [c for c in range(0x30000) if not 0xD800 <= c < 0xE000]  # surrogates are not valid text
    for _ in range(50):
        text = "".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 40)))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_and_vocab(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 512
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi")]) == "<|bos|>hi"
    tb = tokenizer.token_bytes()
    assert tb.dtype == torch.int64 and tb.shape == (tokenizer.vocab_size,)
    assert tb[tokenizer.bos_id] == 0 and int((tb == 0).sum()) == len(SPECIAL_TOKENS) and int(tb.max()) > 1


def test_token_bytes_match_utf8_length_of_real_text(base_dir: Path, tokenizer: Tokenizer) -> None:
    _, val = train_val_shards(data_dir(base_dir))
    texts = list(iter_texts([val], max_chars=200_000))
    tb = tokenizer.token_bytes()
    encoded = tokenizer.encode_batch(texts)
    assert encoded == [tokenizer.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_save_load_gives_identical_encodings(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(tmp_path / "tok")
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.bos_id == tokenizer.bos_id
    assert [loaded.encode(t) for t in SAMPLES] == [tokenizer.encode(t) for t in SAMPLES]
    assert torch.equal(loaded.token_bytes(), tokenizer.token_bytes())


def test_train_is_deterministic_and_validates(tokenizer: Tokenizer) -> None:
    texts = SAMPLES * 20
    assert Tokenizer.train(texts, 300).encode(SAMPLES[1]) == Tokenizer.train(texts, 300).encode(SAMPLES[1])
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(texts, 100)


def test_the_chat_tokens_follow_bos_and_an_old_tokenizer_gets_a_one_line_error(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.special_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))) and ids[0] == tokenizer.bos_id
    assert tokenizer.encode("<|user_start|>") != [tokenizer.special_id("<|user_start|>")]  # text stays text
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    old = HFTokenizer(models.BPE())
    old.add_special_tokens(["<|bos|>"])  # a tokenizer from before the chat tokens: base training still works
    with pytest.raises(ValueError, match=r"no <\|user_start\|> token .* retrain it with `python -m scripts.tok_train`"):
        Tokenizer(old).special_id("<|user_start|>")


def test_get_tokenizer_missing(tmp_path: Path, base_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tokenizer_dir(tmp_path)) in msg and "python -m scripts.tok_train" in msg
    assert get_tokenizer().vocab_size == 512  # default base dir is NANOCHAT_BASE_DIR


# ---- data loader -------------------------------------------------------------------------------------------


def test_batches_follow_the_packed_stream(tokenizer: Tokenizer, base_dir: Path) -> None:
    B, T, n = 4, 64, 12
    loader = DataLoader(tokenizer, B, T, "train", seed=5)
    got = batches(loader, n)
    want = expected_stream(tokenizer, loader, epochs=1)
    assert len(want) > n * B * T
    for i, (x, y) in enumerate(got):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert x.flatten().tolist() == want[i * B * T : (i + 1) * B * T]
        assert y.flatten().tolist() == want[i * B * T + 1 : (i + 1) * B * T + 1]
    assert all(
        torch.equal(a[1][-1, -1], b[0][0, 0]) for a, b in zip(got[:-1], got[1:], strict=True)
    )  # last target carries over
    assert any((x == tokenizer.bos_id).any() for x, _ in got)


def test_same_seed_same_batches_other_seed_differs(tokenizer: Tokenizer, base_dir: Path) -> None:
    a = batches(DataLoader(tokenizer, 2, 32, "train", seed=1), 4)
    b = batches(DataLoader(tokenizer, 2, 32, "train", seed=1, tokenizer_batch=3), 4)
    c = batches(DataLoader(tokenizer, 2, 32, "train", seed=2), 4)
    assert same(a, b) and not same(a, c)


def test_ranks_read_disjoint_documents(tokenizer: Tokenizer, tiny: Path) -> None:
    loaders = [DataLoader(tokenizer, 2, 16, "train", rank=r, world_size=2, data_dir=tiny) for r in range(2)]
    units = [set(dl.units) for dl in loaders]
    assert not units[0] & units[1] and len(units[0] | units[1]) == 2 * 2  # 2 train shards x 2 row groups
    tags = []
    for dl in loaders:
        # more than one epoch of this rank's stream, exactly as the loader hands it out
        got = batches(dl, 12)
        stream = torch.cat([x.flatten() for x, _ in got] + [got[-1][1][-1:, -1]])
        assert stream.tolist() == expected_stream(tokenizer, dl, epochs=3)[: stream.numel()]
        tags.append(set(re.findall(r"doc-\d-\d-\d", tokenizer.decode(stream.tolist()))))
    assert tags[0] and tags[1] and not tags[0] & tags[1]
    assert len(tags[0] | tags[1]) == 16  # together the ranks cover every training document


def test_resume_is_exact_including_across_epochs(tokenizer: Tokenizer, tiny: Path) -> None:
    make = lambda: DataLoader(tokenizer, 2, 16, "train", seed=7, data_dir=tiny, tokenizer_batch=3)
    total = 60  # about three epochs of the 4 tiny training units
    reference = batches(make(), total)
    epochs = set()
    # resume points include document starts (offset 0), unit ends and the last batches before an epoch ends
    for k in (0, 1, 5, 8, 13, 17, 18, 22, 35, 36, 37, 50):
        loader = make()
        batches(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))
        epochs.add(state["epoch"])
        assert all(isinstance(v, (int, str, type(None))) for v in state.values())
        resumed = make()
        resumed.load_state_dict(state)
        assert same(batches(resumed, total - k), reference[k:]), f"resume after {k} batches diverged"
    assert epochs == {0, 1, 2}, f"resume points should span epoch boundaries, got epochs {epochs}"


def test_resume_with_other_batch_shape_continues_the_stream(tokenizer: Tokenizer, tiny: Path) -> None:
    a = DataLoader(tokenizer, 2, 16, "train", data_dir=tiny)
    batches(a, 3)
    b = DataLoader(tokenizer, 1, 8, "train", data_dir=tiny)
    b.load_state_dict(a.state_dict())
    x_a, _ = a.next_batch()
    x_b, y_b = b.next_batch()
    assert x_b.flatten().tolist() == x_a.flatten()[:8].tolist() and y_b[0, -1] == x_a.flatten()[8]


def test_load_state_dict_rejects_mismatches(tokenizer: Tokenizer, tiny: Path) -> None:
    state = DataLoader(tokenizer, 2, 16, "train", rank=0, world_size=2, data_dir=tiny).state_dict()
    for kwargs, key in (
        ({"rank": 1, "world_size": 2}, "rank"),
        ({"rank": 0, "world_size": 1}, "world_size"),
        ({"rank": 0, "world_size": 2, "seed": 9}, "seed"),
    ):
        other = DataLoader(tokenizer, 2, 16, "train", data_dir=tiny, **kwargs)
        with pytest.raises(ValueError, match=f"saved with {key}="):
            other.load_state_dict(state)
    loader = DataLoader(tokenizer, 2, 16, "train", rank=0, world_size=2, data_dir=tiny)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="data directory changed"):
        loader.load_state_dict({**state, "row_group": 5})


def test_val_is_one_pass_then_stop(tokenizer: Tokenizer, tiny: Path) -> None:
    B, T = 2, 16
    loader = DataLoader(tokenizer, B, T, "val", data_dir=tiny)
    assert [u.shard.name for u in loader.units] == ["shard_00002.parquet"] * 2
    total = len(expected_stream(tokenizer, loader, epochs=1))
    got = list(loader)
    assert len(got) == (total - 1) // (B * T) and got
    with pytest.raises(StopIteration):
        loader.next_batch()
    again = DataLoader(tokenizer, B, T, "val", data_dir=tiny, seed=123)  # val order ignores the seed
    assert same(list(again), got)


def test_loader_input_errors(tokenizer: Tokenizer, tiny: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        DataLoader(tokenizer, 2, 16, "test", data_dir=tiny)
    with pytest.raises(ValueError, match="fewer than world_size=3"):
        DataLoader(tokenizer, 2, 16, "val", rank=2, world_size=3, data_dir=tiny)
    with pytest.raises(FileNotFoundError, match="no data shards"):
        DataLoader(tokenizer, 2, 16, "train", data_dir=tiny / "missing")


# ---- download ----------------------------------------------------------------------------------------------


class ShardServer:
    """A local HTTP server for shard files; `plan[name]` lists failures for its next requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plan: dict[str, list[str]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                with server.lock:
                    server.hits[name] += 1
                    action = server.plan[name].pop(0) if server.plan.get(name) else "ok"
                path = server.root / name
                if action == "503":
                    self.send_error(503, "try again")
                    return
                if not path.is_file():
                    self.send_error(404, "no such shard")
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if action == "truncate" else data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shard_{{i:05d}}.parquet"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path: Path):
    write_tiny_shards(tmp_path / "served", shards=3)
    srv = ShardServer(tmp_path / "served")
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_download_retries_and_skips_present(server: ShardServer, tmp_path: Path) -> None:
    server.plan = {"shard_00001.parquet": ["503"], "shard_00002.parquet": ["truncate", "503"]}
    out = tmp_path / "out"
    paths = download_shards(3, out, server.url, retries=3, workers=2, backoff=0.01)
    assert [p.read_bytes() for p in paths] == [(server.root / p.name).read_bytes() for p in paths]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]  # no temp files
    assert server.hits == Counter({"shard_00000.parquet": 1, "shard_00001.parquet": 2, "shard_00002.parquet": 3})
    download_shards(3, out, server.url, backoff=0.01)
    assert sum(server.hits.values()) == 6  # everything was already there


def test_download_failures_are_clear_and_clean(server: ShardServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_shards(5, out, server.url, retries=3, workers=1, backoff=0.01)  # shards 3, 4 do not exist
    assert server.hits["shard_00003.parquet"] == 1  # a 404 is not retried
    server.plan = {"shard_00000.parquet": ["503"] * 3}
    (out / "shard_00000.parquet").unlink()
    with pytest.raises(DownloadError, match="503"):
        download_shards(1, out, server.url, retries=2, backoff=0.01)
    assert server.hits["shard_00000.parquet"] == 1 + 3
    assert all(p.name.startswith("shard_") and p.suffix == ".parquet" for p in out.iterdir())
    with pytest.raises(ValueError, match="between 1 and 1823"):
        download_shards(1824, out, server.url)
    with pytest.raises(ValueError, match="url pattern"):
        download_shards(2, out, "http://127.0.0.1/fixed.parquet")


def test_download_cli(server: ShardServer, tmp_path: Path, env: dict[str, str]) -> None:
    server.plan = {"shard_00001.parquet": ["503"]}
    env = {**env, "NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    cmd = [sys.executable, "-m", "nanochat.dataset", "-n", "2", "--url-pattern", server.url, "--workers", "2"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "downloaded 2 shards" in proc.stdout
    got = sorted(p.name for p in (tmp_path / "base" / "base_data").iterdir())
    assert got == ["shard_00000.parquet", "shard_00001.parquet"]


# ---- command lines -----------------------------------------------------------------------------------------


def test_builtin_and_tok_train_clis(tmp_path: Path, env: dict[str, str]) -> None:
    env = {**env, "NANOCHAT_BASE_DIR": str(tmp_path)}
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    proc = run("nanochat.dataset", "--builtin", "--num-shards", "2", "--max-docs", "30")
    assert proc.returncode == 0 and "wrote 2 built-in shards (30 documents" in proc.stdout, proc.stderr
    proc = run("scripts.tok_train", "--vocab_size=300", "--max_chars", "200000", "--doc_cap=5000")
    assert proc.returncode == 0, proc.stderr
    assert "vocab size 300" in proc.stdout and "bytes/token" in proc.stdout
    assert Tokenizer.load(tokenizer_dir(tmp_path)).vocab_size == 300


def test_cli_errors_are_one_line(tmp_path: Path, env: dict[str, str], refused_port: int) -> None:
    env = {**env, "NANOCHAT_BASE_DIR": str(tmp_path)}
    down = f"http://127.0.0.1:{refused_port}"  # nothing listens there
    cases = [
        (["nanochat.dataset"], "one of the arguments -n --builtin is required"),
        (["nanochat.dataset", "-n", "0"], "between 1 and 1823"),
        (["nanochat.dataset", "-n", "5000"], "between 1 and 1823"),
        (["nanochat.dataset", "-n", "2", "--url-pattern", f"{down}/x.parquet"], "url pattern"),
        (
            ["nanochat.dataset", "-n", "1", "--url-pattern", f"{down}/{{i}}", "--retries", "0"],
            "check the network",
        ),
        (["nanochat.dataset", "--builtin", "--num-shards", "1"], "at least 2"),
        (["scripts.tok_train"], "python -m nanochat.dataset --builtin"),
        (["scripts.tok_train", "--vocab_size=100"], "at least 265"),
        (["scripts.tok_train", "--vocab_size", "lots"], "invalid int value"),
    ]
    # run them concurrently: each one pays the interpreter + torch start-up
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for args, _ in cases
    ]
    for (args, needle), p in zip(cases, procs, strict=True):
        out, err = p.communicate(timeout=120)
        proc = subprocess.CompletedProcess(args, p.returncode, out.decode(), err.decode())
        assert_one_line_error(proc, needle)


FORK_SCRIPT = """
import multiprocessing as mp
from nanochat.tokenizer import get_tokenizer
tok = get_tokenizer()
texts = ["some text to encode, " * 50] * 256
want = tok.encode_batch(texts)  # starts the thread pool in the parent
def child(q):
    q.put(tok.encode_batch(texts) == want)
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
assert q.get(timeout=60)
p.join()
print("ok")
"""


def test_fork_after_batch_encode_neither_deadlocks_nor_warns(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "TOKENIZERS_PARALLELISM"}  # as in a fresh shell
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "huggingface/tokenizers" not in proc.stderr, proc.stderr
