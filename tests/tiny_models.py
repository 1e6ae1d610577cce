"""Tiny in-process models of two architectures with two different tokenizers, for fast tests.

- `build_tiny_llama(folder)`: Llama architecture, byte-level BPE tokenizer (`Ġ` space marker,
  no BOS added), like SmolLM2.
- `build_tiny_gemma(folder)`: Gemma3 text architecture (softcapped logits, one sliding-window
  layer), SentencePiece-style BPE tokenizer (`▁` space marker, byte fallback, adds `<bos>`),
  like Gemma-3.

Each writes a Hugging Face model folder (config, safetensors, tokenizer) that
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` load and that works as
a fusedata model spec. Weights are seeded, so outputs are deterministic. Building both takes
well under a second.

`write_corpus(path)` writes a small real-ish JSONL corpus (prose, code, a non-ASCII line).
"""

from __future__ import annotations

import json
from pathlib import Path

# A few KB of ordinary English, code and non-ASCII text to train the tokenizers on.
TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all afternoon.
Knowledge fusion combines the strengths of several language models into one target model.
Each source model predicts a distribution over the next token at every position of the text.
A river runs through the old town, and in the spring the water rises over the stone bridge.
Children walk to school along the river, and the baker opens his shop before the sun rises.
The committee met on Tuesday to discuss the budget for the coming year and the new library.
Scientists measured the temperature of the lake every morning for three years in a row.
She wrote a letter to her brother, who lived in a small village far to the north.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self):
        self.count += 1
        return self.count
Le café est très bon, et l'été à Paris est agréable. Élodie a mangé une crêpe.
Numbers like 1, 2, 3, 42 and 2024 appear in text; so do symbols such as (), [], {}, <, > and =.
"""

# Documents of the test corpus: prose, code, and a line with 2-, 3- and 4-byte UTF-8 characters.
CORPUS_DOCS = [
    {"id": "prose-1", "text": (
        "The old lighthouse stood at the end of the pier, and every night its lamp turned slowly "
        "over the dark water. Fishermen coming home late looked for the light and steered by it. "
        "In the morning the keeper climbed down the narrow stairs, made his tea, and wrote the "
        "weather in a thick book that nobody else ever read."
    )},
    {"id": "code-1", "text": (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "print([fibonacci(i) for i in range(10)])\n"
    )},
    {"id": "utf8-1", "text": "Le café coûte 3 € — très bon! 😀 Ça va? naïve façade, ünïcödé."},
    {"id": "prose-2", "text": (
        "Rain fell on the city for three days. The streets filled with water and the buses stopped "
        "running, so people walked to work under black umbrellas."
    )},
    {"id": "short-1", "text": "Hello world."},
]

SPECIAL = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}


def _train_bpe(tokenizer, vocab_size: int, special: list[str], alphabet: list[str] | None = None) -> None:
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=special, initial_alphabet=alphabet or [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAIN_TEXT.splitlines(keepends=True) * 2, trainer=trainer)


def byte_level_tokenizer(vocab_size: int = 400):
    """Byte-level BPE (GPT-2 / SmolLM2 style: `Ġ` marks a space), no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets include its leading space, like its string does
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _train_bpe(tok, vocab_size, ["<|endoftext|>", "<|pad|>"], pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token=None,
        bos_token=None, add_bos_token=False,
    )


def metaspace_tokenizer(merges_vocab: int = 300):
    """SentencePiece-style BPE (Gemma style): `▁` marks a space, unknown characters fall back to
    `<0xNN>` byte tokens, and `<bos>` is added at the start of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["pad"], SPECIAL["eos"], SPECIAL["bos"], SPECIAL["unk"]]
    trainer_tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    _train_bpe(trainer_tok, merges_vocab, specials)
    trained = json.loads(trainer_tok.to_str())["model"]
    # Vocabulary: specials, then the 256 byte-fallback tokens, then the trained pieces.
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIAL["unk"], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = vocab[SPECIAL["bos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B", special_tokens=[(SPECIAL["bos"], bos)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], add_bos_token=True,
    )


def build_tiny_llama(folder: str | Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 48) with a byte-level BPE tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_gemma(folder: str | Path, seed: int = 0) -> Path:
    """A 2-layer Gemma3 text model (one sliding-window layer, softcapped logits, tied embeddings)
    with a SentencePiece-style tokenizer that adds `<bos>`, saved to `folder`."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(folder)
    tok = metaspace_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=5.0, initializer_range=0.2, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: str | Path, docs: list[dict] | None = None) -> Path:
    """Write the test corpus as JSONL (one record per line, UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs if docs is not None else CORPUS_DOCS:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def _permute_for_gguf(w, n_head: int):
    """Rows of a q/k projection in llama.cpp's rotary order (transformers undoes this on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(llama_folder: str | Path, path: str | Path) -> Path:
    """The tiny Llama of `build_tiny_llama` as an F32 GGUF file (llama.cpp's names and layout,
    byte-level `gpt2` tokenizer), written with gguf.GGUFWriter; transformers loads it like a real one."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    folder, path = Path(llama_folder), Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    n_head, n_kv, n_layer = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])

    sd = load_file(str(folder / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(n_layer):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in per_layer.items()})
    for hf, g in names.items():
        t = sd[hf].astype(np.float32)
        if g.endswith("attn_q.weight"):
            t = _permute_for_gguf(t, n_head)
        elif g.endswith("attn_k.weight"):
            t = _permute_for_gguf(t, n_kv)
        w.add_tensor(g, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
