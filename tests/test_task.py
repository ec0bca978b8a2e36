"""The built-in task: ByteLM (shapes, causality, deterministic init, sizes) and the corpus (split, shards, batches)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm.task import SIZES, Batches, ByteLM, Corpus, DataConfig, ModelConfig, build_model, count_params, evaluate
from swarm.task.bytes import ByteSeq
from swarm.task.data import SEPARATOR

SEQ = 64  # shorter than tiny's max_seq_len, to keep the CPU tests quick


@pytest.fixture(scope="module")
def stdlib_corpus() -> Corpus:
    return Corpus.load(DataConfig())


@pytest.fixture(scope="module")
def tiny() -> ByteLM:
    return build_model("tiny", seed=0)


def _write_files(root: Path, count: int, size: int = 300, start: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        (root / f"file{i:03d}.txt").write_text(f"# file {i}\n" + "x = 1\n" * (size // 6))


# ---- model ----


def test_forward_shapes_and_pieces_compose(tiny: ByteLM) -> None:
    tokens = torch.randint(0, 256, (3, SEQ))
    logits = tiny(tokens)
    assert logits.shape == (3, SEQ, 256)
    h = tiny.embed_tokens(tokens)
    staged = tiny.run_blocks(tiny.run_blocks(h, 0, 1), 1)  # two "stages" of one block each
    torch.testing.assert_close(tiny.logits(staged), logits, rtol=0, atol=0)
    loss = tiny.loss(torch.randint(0, 256, (3, SEQ + 1)))
    assert loss.ndim == 0 and loss.dtype == torch.float32


def test_too_long_input_and_bad_batch_are_refused(tiny: ByteLM) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(torch.zeros(1, SIZES["tiny"].max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch must be"):
        tiny.loss(torch.zeros(4, 1, dtype=torch.long))


def test_changing_a_future_token_leaves_earlier_logits_alone(tiny: ByteLM) -> None:
    tokens = torch.randint(0, 256, (2, SEQ))
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    with torch.no_grad():
        before, after = tiny(tokens), tiny(changed)
    torch.testing.assert_close(before[:, :40], after[:, :40], rtol=0, atol=0)
    assert not torch.equal(before[:, 40:], after[:, 40:])


def test_build_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng = torch.get_rng_state()
    a, b, c = build_model("tiny", seed=7), build_model("tiny", seed=7), build_model("tiny", seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert not torch.equal(a.blocks[1].mlp.down.weight, c.blocks[1].mlp.down.weight)


def test_init_scales_residual_projections_and_sets_norms_to_one() -> None:
    model = build_model("small")
    layers = SIZES["small"].n_layers
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.out.weight.std().item() == pytest.approx(0.02 / (2 * layers) ** 0.5, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_blocks_have_identical_shapes_and_no_rotary_state(tiny: ByteLM) -> None:
    shapes = [{name: p.shape for name, p in block.named_parameters()} for block in tiny.blocks]
    assert all(s == shapes[0] for s in shapes)
    assert not any("rope" in name for name in tiny.state_dict())
    # The rotary tables are still there, and correct after build_model's to_empty.
    cos = tiny.blocks[0].attn.rope_cos
    assert torch.equal(cos[0], torch.ones_like(cos[0]))


@pytest.mark.parametrize(
    ("size", "total", "non_embedding"),
    [("tiny", 133_440, 100_672), ("small", 3_295_488, 3_164_416), ("124m", 85_347_072, 84_953_856)],
)
def test_param_counts_match_the_documented_sizes(size: str, total: int, non_embedding: int) -> None:
    with torch.device("meta"):  # no memory, no init: 124m counts in milliseconds
        model = ByteLM(SIZES[size])
    assert count_params(model) == total
    assert count_params(model, non_embedding=True) == non_embedding


def test_bad_sizes_and_configs_name_the_option() -> None:
    with pytest.raises(ValueError, match="tiny, small, 124m"):
        build_model("huge")
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelConfig(dim=66, n_layers=1, n_heads=4, ffn_hidden=8, max_seq_len=8)
    with pytest.raises(ValueError, match="must be even"):
        ModelConfig(dim=12, n_layers=1, n_heads=4, ffn_hidden=8, max_seq_len=8)
    with pytest.raises(ValueError, match="model.n_layers"):
        ModelConfig(dim=8, n_layers=0, n_heads=2, ffn_hidden=8, max_seq_len=8)


def test_tiny_model_learns_the_stdlib_corpus(stdlib_corpus: Corpus) -> None:
    # Measured: eval loss 5.58 (about ln 256) before, 2.85 after 100 steps; 4.0 leaves a wide margin.
    model = build_model("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = Batches(stdlib_corpus.shard(0, 1), seq_len=128, batch_size=8, seed=0)

    def score() -> float:
        return evaluate(model, stdlib_corpus.eval, seq_len=128, batch_size=8, batches=4, device="cpu")

    before = score()
    for _ in range(100):
        model.loss(next(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = score()
    assert before > 5.3
    assert after < 4.0, f"eval loss {before:.2f} -> {after:.2f}"


# ---- data ----


def test_stdlib_corpus_split_is_deterministic_and_disjoint(stdlib_corpus: Corpus) -> None:
    again = Corpus.load(DataConfig())
    assert torch.equal(again.train.tensor(), stdlib_corpus.train.tensor())
    assert torch.equal(again.eval.tensor(), stdlib_corpus.eval.tensor())
    assert stdlib_corpus.eval_files and stdlib_corpus.train_files
    assert not set(stdlib_corpus.eval_files) & set(stdlib_corpus.train_files)
    assert stdlib_corpus.train_files == sorted(stdlib_corpus.train_files)
    assert not any("test" in name.split("/")[:-1] for name in stdlib_corpus.train_files + stdlib_corpus.eval_files)
    assert stdlib_corpus.train.tensor().dtype == torch.uint8
    assert len(stdlib_corpus.train) > 1_000_000 and len(stdlib_corpus.eval) > 10_000


def test_split_by_path_hash_survives_adding_files(tmp_path: Path) -> None:
    config = DataConfig(paths=[str(tmp_path / "docs")], eval_fraction=0.2, seq_len=16, batch_size=2)
    _write_files(tmp_path / "docs", 40)
    first = Corpus.load(config)
    _write_files(tmp_path / "docs", 20, start=40)
    second = Corpus.load(config)
    assert set(first.eval_files) <= set(second.eval_files)
    assert set(first.train_files) <= set(second.train_files)
    assert len(second.eval_files) > len(first.eval_files)


def test_shards_are_disjoint_and_cover_the_train_set(stdlib_corpus: Corpus) -> None:
    shards = [stdlib_corpus.shard(i, 3) for i in range(3)]
    assert torch.equal(torch.cat([s.tensor() for s in shards]), stdlib_corpus.train.tensor())
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(ValueError, match="shard index"):
        stdlib_corpus.shard(3, 3)


def test_batches_are_deterministic_per_peer_and_resume(stdlib_corpus: Corpus) -> None:
    shard = stdlib_corpus.shard(0, 2)

    def make(peer: int) -> Batches:
        return Batches(shard, seq_len=SEQ, batch_size=4, seed=1, peer=peer)

    a, b, other = make(0), make(0), make(1)
    first = next(a)
    assert first.shape == (4, SEQ + 1) and first.dtype == torch.long
    assert torch.equal(first, next(b))
    assert not torch.equal(first, next(other))
    # Each row is a real window: over bytes 0, 1, 2, ... every row counts up by one.
    counting = next(Batches(torch.arange(200, dtype=torch.uint8), seq_len=SEQ, batch_size=8))
    assert torch.equal(counting - counting[:, :1], torch.arange(SEQ + 1).expand(8, -1))

    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    resumed = make(0)
    resumed.load_state_dict(state)
    assert resumed.step == 1
    assert all(torch.equal(x, next(resumed)) for x in expected)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"step": 3})


def test_evaluate_is_repeatable_and_restores_mode(tiny: ByteLM, stdlib_corpus: Corpus) -> None:
    tiny.train()
    kwargs = {"seq_len": SEQ, "batch_size": 4, "batches": 2, "device": "cpu"}
    first = evaluate(tiny, stdlib_corpus.eval, **kwargs)
    assert tiny.training
    assert evaluate(tiny, stdlib_corpus.eval, **kwargs) == first


def test_user_files_and_directories(tmp_path: Path) -> None:
    _write_files(tmp_path / "notes", 10)
    (tmp_path / "notes" / "image.bin").write_bytes(b"\x89PNG\0\0\0" * 100)  # binary: skipped in a directory
    (tmp_path / "notes" / ".hidden").write_text("secret " * 100)
    single = tmp_path / "book.txt"
    single.write_text("Call me Ishmael. " * 200)
    corpus = Corpus.load(DataConfig(paths=[str(tmp_path / "notes"), str(single)], seq_len=32, batch_size=4))
    names = corpus.train_files + corpus.eval_files
    assert sorted(names) == sorted([f"notes/file{i:03d}.txt" for i in range(10)] + ["book.txt"])
    # One separator byte between neighbouring files, and no other 0 byte (the binary file is out).
    assert int((corpus.train.tensor() == SEPARATOR[0]).sum()) == len(corpus.train_files) - 1
    assert int((corpus.eval.tensor() == SEPARATOR[0]).sum()) == len(corpus.eval_files) - 1

    # A single file is split by bytes: its tail is the eval set.
    alone = Corpus.load(DataConfig(paths=[str(single)], seq_len=32, batch_size=4))
    assert bytes(alone.train.tensor().numpy()) + bytes(alone.eval.tensor().numpy()) == single.read_bytes()
    assert len(alone.eval) >= 33


def test_max_bytes_caps_what_is_read(tmp_path: Path) -> None:
    _write_files(tmp_path / "docs", 20, size=600)
    corpus = Corpus.load(DataConfig(paths=[str(tmp_path / "docs")], max_bytes=3000, seq_len=16, batch_size=2))
    assert len(corpus.train) + len(corpus.eval) - (len(corpus.train_files) + len(corpus.eval_files) - 2) == 3000


def test_clear_errors_for_missing_paths_and_too_little_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Corpus.load(DataConfig(paths=[str(tmp_path / "nope.txt")]))
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(ValueError, match="too little text"):
        Corpus.load(DataConfig(paths=[str(small)]))
    with pytest.raises(ValueError, match="data.eval_fraction"):
        DataConfig(eval_fraction=0)
    with pytest.raises(ValueError, match="data.seq_len"):
        Batches(torch.zeros(10, dtype=torch.uint8), seq_len=16, batch_size=1)


# ---- large corpora: memory-mapped files, ByteSeq ----

_MiB = 1 << 20


def _write_big(path: Path, mib: int) -> bytes:
    """A file of `mib` MiB of text, written 1 MiB at a time; returns its first MiB."""
    line = b"The quick brown fox jumps over the lazy dog.\n"
    chunk = (line * (_MiB // len(line) + 1))[:_MiB]
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(chunk)
    return chunk


def test_a_file_over_64_mib_is_used_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    chunk = _write_big(big, 65)
    corpus = Corpus.load(DataConfig(paths=[str(big)]))
    assert len(corpus.train) + len(corpus.eval) == 65 * _MiB
    # The last bytes of the file are the last bytes of the eval tail.
    end = corpus.eval.windows(torch.tensor([len(corpus.eval) - 100]), 100)
    assert bytes(end[0].numpy()) == chunk[-100:]


def test_large_files_are_memory_mapped_and_small_ones_joined_in_memory(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    _write_big(docs / "big.txt", 2)
    _write_files(docs, 30)
    corpus = Corpus.load(DataConfig(paths=[str(docs)], seq_len=16, batch_size=2))
    parts = corpus.train.parts + corpus.eval.parts
    mapped = [p for p in parts if isinstance(p, np.memmap)]
    assert len(mapped) == 1 and len(mapped[0]) == 2 * _MiB and mapped[0].mode == "r"
    # The 30 small files and the separators between them sit in at most one array on either
    # side of the big file in train, and one array in eval.
    assert len(parts) <= 4
    # A cap that ends inside the big file cuts the map, still without reading it.
    capped = Corpus.load(DataConfig(paths=[str(docs / "big.txt")], max_bytes=_MiB + 5, seq_len=16, batch_size=2))
    assert len(capped.train) + len(capped.eval) == _MiB + 5
    assert all(isinstance(p, np.memmap) for p in capped.train.parts + capped.eval.parts)


def test_a_corpus_of_user_files_is_the_files_joined_by_the_separator_in_order(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    _write_files(docs, 12, size=900)
    _write_big(docs / "file003.txt", 1)  # mapped ones among the small ones, in train or eval
    _write_big(docs / "file007.txt", 2)
    _write_big(docs / "file010.txt", 1)
    corpus = Corpus.load(DataConfig(paths=[str(docs)], eval_fraction=0.3, seq_len=16, batch_size=2))
    for seq, names in ((corpus.train, corpus.train_files), (corpus.eval, corpus.eval_files)):
        expected = SEPARATOR.join((tmp_path / name).read_bytes() for name in names)
        assert bytes(seq.tensor().numpy()) == expected
    assert sorted(corpus.train_files + corpus.eval_files) == [f"docs/file{i:03d}.txt" for i in range(12)]
    assert any(isinstance(p, np.memmap) for p in corpus.train.parts)

    # Batches and evaluate draw the same windows from the ByteSeq as from its bytes in memory.
    shard = corpus.shard(1, 2)
    a, b = (Batches(data, seq_len=SEQ, batch_size=16, seed=3) for data in (shard, shard.tensor()))
    for _ in range(20):
        assert torch.equal(next(a), next(b))


def test_byteseq_windows_across_part_boundaries_equal_windows_of_the_joined_bytes() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 5, 300, 1, 0, 40, 2000, 3, 77)]
    seq = ByteSeq(parts)
    joined = torch.from_numpy(np.concatenate(parts))
    assert len(seq) == len(joined) and torch.equal(seq.tensor(), joined)
    for length in (1, 4, 64, 500):
        starts = torch.from_numpy(rng.integers(0, len(seq) - length + 1, 200))
        expected = joined[starts[:, None] + torch.arange(length)]
        assert torch.equal(seq.windows(starts, length), expected), length
    # A slice is a view over the same parts and reads the same bytes as the slice of the joined bytes.
    for start, stop in ((0, len(seq)), (3, 7), (6, 2300), (305, 306), (2400, -1)):
        view = seq[start:stop]
        assert torch.equal(view.tensor(), joined[start:stop]), (start, stop)
        if len(view) >= 10:
            starts = torch.arange(len(view) - 9)
            assert torch.equal(view.windows(starts, 10), joined[start:stop][starts[:, None] + torch.arange(10)])
    assert len(seq[5:5]) == 0 and np.shares_memory(seq[6:300].parts[0], parts[2])
    for data in (seq, ByteSeq([parts[6]])):  # several parts, and one
        for start in (len(data) - 3, -1):
            with pytest.raises(IndexError, match="do not fit"):
                data.windows(torch.tensor([0, start]), 4)
    with pytest.raises(TypeError, match="slices"):
        seq[::2]


def test_many_bytes_of_small_files_in_memory_warn_and_say_how_to_avoid_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _write_files(tmp_path / "docs", 10)
    monkeypatch.setattr("swarm.task.data._WARN_IN_MEMORY_BYTES", 1000)
    with caplog.at_level(logging.WARNING, logger="swarm.task"):
        Corpus.load(DataConfig(paths=[str(tmp_path / "docs")], seq_len=16, batch_size=2))
    assert any(r.levelno == logging.WARNING and "join the small files" in r.getMessage() for r in caplog.records)


def test_running_out_of_file_descriptors_is_an_error_not_a_smaller_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_big(tmp_path / "big.txt", 1)

    def no_descriptors(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "memmap", no_descriptors)
    with pytest.raises(ValueError, match="ulimit -n"):
        Corpus.load(DataConfig(paths=[str(tmp_path)], seq_len=16, batch_size=2))
