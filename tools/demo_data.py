"""The demo's data: English text that ships with CPython, grouped into rows, and a tokenizer trained on it.

``write_data`` writes ``train.jsonl`` / ``validation.jsonl`` rows ``{"title", "text"}`` of up to about
:data:`SEQ_LEN` tokens and a byte-level BPE tokenizer; ``unigram_baseline`` is what a model that ignores context
reaches on the validation split.
"""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

VOCAB_SIZE = 1024
SEQ_LEN = 128
CHARS_PER_ROW = 4 * SEQ_LEN  # about 4 characters per token with this tokenizer
VAL_FRACTION = 0.1


def english_paragraphs() -> list[tuple[str, str]]:
    """``(topic, paragraph)`` pairs from the Python reference manual, in a fixed order."""
    from pydoc_data.topics import topics

    return [(name, p.strip()) for name in sorted(topics) for p in topics[name].split("\n\n") if len(p.strip()) > 40]


def write_data(data_dir: Path) -> dict[str, int]:
    """``train.jsonl``, ``validation.jsonl`` (``{"title", "text"}`` rows) and ``tokenizer/``; returns rows per split."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = []
    for title, paragraph in english_paragraphs():
        # Consecutive paragraphs of a topic share a row up to about SEQ_LEN tokens: less padding.
        if rows and rows[-1]["title"] == title and len(rows[-1]["text"]) + len(paragraph) < CHARS_PER_ROW:
            rows[-1]["text"] += "\n\n" + paragraph
        else:
            rows.append({"title": title, "text": paragraph})
    random.Random(0).shuffle(rows)
    # Even, so that 2 ranks split it without the sampler repeating a row.
    n_val = int(len(rows) * VAL_FRACTION) // 2 * 2
    splits = {"validation": rows[:n_val], "train": rows[n_val:]}

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["title"] + " " + r["text"] for r in splits["train"]), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")

    tmp = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    for name, part in splits.items():
        with open(tmp / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    shutil.rmtree(data_dir, ignore_errors=True)
    tmp.rename(data_dir)
    return {name: len(part) for name, part in splits.items()}


def unigram_baseline(data_dir: Path) -> float:
    """Validation CE (nats/token) of the train split's unigram distribution, add-one smoothed:
    what a model that ignores context can reach. Counts the tokens the dataset puts loss on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")

    def tokens(split):
        for line in open(data_dir / f"{split}.jsonl"):
            row = json.loads(line)
            full = tokenizer(row["title"] + " " + row["text"], truncation=True, max_length=SEQ_LEN)["input_ids"]
            yield from full[len(tokenizer(row["title"] + " ")["input_ids"]):]

    counts = Counter(tokens("train"))
    total = sum(counts.values()) + len(tokenizer)
    val = list(tokens("validation"))
    return -sum(math.log((counts[t] + 1) / total) for t in val) / len(val)
