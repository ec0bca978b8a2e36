"""`--model hf:PATH`: a Hugging Face causal LM built from a local folder (a tiny Llama config and a tokenizer
trained here: nothing is downloaded), its tokenizer over text, JSONL and Parquet data, trained by real peers,
checkpointed, and exported in Hugging Face format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm.task import Batches, DataConfig, evaluate
from swarm.task.hf import HFCausalLM, load_hf
from swarm.task.tokens import TokenCorpus

SWARM = [sys.executable, "-m", "swarm.cli.main"]
TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]


def make_model_folder(folder: Path) -> Path:
    """A tiny Llama config and a byte-level BPE tokenizer trained on TEXTS, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                eos_token_id=fast.eos_token_id).save_pretrained(folder)
    return folder


def make_data(folder: Path) -> Path:
    """The same documents as a text file, a JSONL file and a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "a.txt").write_text("".join(TEXTS[:100]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[100:300])))
    pq.write_table(pa.table({"text": TEXTS[300:]}), folder / "c.parquet")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_a_config_folder_builds_the_same_model_on_every_peer_with_a_next_token_loss(model_dir: Path) -> None:
    a, tok = load_hf(f"hf:{model_dir}", seed=3)
    b, _ = load_hf(f"hf:{model_dir}", seed=3)
    assert isinstance(a, HFCausalLM) and tok is not None and a.vocab_size == len(tok)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    batch = torch.randint(0, a.vocab_size, (2, 17))
    loss = a.loss(batch)
    assert torch.isfinite(loss) and 4.0 < loss.item() < 8.0  # about ln(320) at the start


@pytest.mark.parametrize("spec, why", [("hf:", "needs a folder"), ("hf:./no/such/folder", "is not a folder")])
def test_a_model_that_is_not_there_is_refused_with_the_reason(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        load_hf(spec)


def test_text_jsonl_and_parquet_are_tokenized_once_and_mapped(tmp_path: Path, model_dir: Path) -> None:
    _, tok = load_hf(f"hf:{model_dir}")
    data = make_data(tmp_path / "data")
    config = DataConfig(paths=[str(data)], seq_len=32, batch_size=2, eval_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    corpus = TokenCorpus.load(config, tok)
    assert corpus.documents == 1 + 200 + 100  # the text file is one document, each record another
    eos = tok.eos_token_id
    assert int((corpus.train == eos).sum() + (corpus.eval == eos).sum()) == corpus.documents
    assert len(corpus.eval) > 0 and corpus.train.dtype == torch.int32 and int(corpus.train.max()) < len(tok)
    stamp = (corpus.folder / "train.bin").stat().st_mtime_ns
    again = TokenCorpus.load(config, tok)
    assert again.folder == corpus.folder and (again.folder / "train.bin").stat().st_mtime_ns == stamp
    assert torch.equal(again.train, corpus.train)
    shards = [corpus.shard(i, 3) for i in range(3)]
    assert sum(len(s) for s in shards) == len(corpus.train)
    batch = next(Batches(shards[0], seq_len=32, batch_size=2))
    assert batch.shape == (2, 33)
    model, _ = load_hf(f"hf:{model_dir}")
    assert evaluate(model, corpus.eval, seq_len=32, batch_size=2, batches=2, device="cpu") > 0


def test_bad_records_are_refused_naming_the_file_and_line(tmp_path: Path, model_dir: Path) -> None:
    _, tok = load_hf(f"hf:{model_dir}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        TokenCorpus.load(DataConfig(paths=[str(bad)], cache_dir=str(tmp_path / "c")), tok)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        TokenCorpus.load(DataConfig(paths=[str(bad)], cache_dir=str(tmp_path / "c")), tok)
    assert not list((tmp_path / "c").iterdir())  # nothing half-written left in the cache


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_peers_train_an_hf_model_to_one_hash_and_export_it_for_from_pretrained(
        tmp_path: Path, model_dir: Path, coordinator_proc) -> None:
    data = make_data(tmp_path / "data")
    coord = coordinator_proc(extra_args=["--min-peers", "2"])
    procs = []
    for i in range(2):
        with open(tmp_path / f"p{i}.out", "wb") as out, open(tmp_path / f"p{i}.err", "wb") as err:
            procs.append(subprocess.Popen([
                *SWARM, "peer", "--coordinator", coord.target, "--peer-id", f"p{i}", "--model", f"hf:{model_dir}",
                "--data", str(data), "--data.cache-dir", str(tmp_path / "cache"), "--seq-len", "32",
                "--batch-size", "4", "--steps", "40", "--inner-steps", "10", "--threads", "1", "--shard", f"{i}/2",
                "--checkpoint-dir", str(tmp_path / f"ckpt-{i}")], stdout=out, stderr=err))
    for i, p in enumerate(procs):
        assert p.wait(timeout=240) == 0, (tmp_path / f"p{i}.err").read_text()[-3000:]
    reports = [json.loads((tmp_path / f"p{i}.out").read_text().splitlines()[-1])["peer_report"] for i in range(2)]
    assert reports[0]["state_hash"] == reports[1]["state_hash"] and reports[0]["rounds_committed"] == 4
    evals = reports[0]["extra"]["evals"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, evals

    out = tmp_path / "exported"
    done = subprocess.run([*SWARM, "export", str(tmp_path / "ckpt-0"), "--to", str(out)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = HFCausalLM(AutoModelForCausalLM.from_pretrained(out), "exported")
    tok = AutoTokenizer.from_pretrained(out)
    corpus = TokenCorpus.load(DataConfig(paths=[str(data)], seq_len=32, batch_size=4,
                                         cache_dir=str(tmp_path / "cache")), tok)
    loss = evaluate(model, corpus.eval, seq_len=32, batch_size=4, batches=8, device="cpu")
    assert abs(loss - reports[0]["extra"]["final_eval_loss"]) < 1e-4
