"""The causal language model plugin: a transformers causal LM, its tokenizer, and new special tokens.

Two sources:

* ``model=None`` (default): a tiny randomly initialized Llama or Qwen2 config and an OFFLINE,
  deterministic word-level tokenizer whose vocabulary is built from the words the registered
  tasks declare (:func:`avmt.tasks.all_words`), so nothing is downloaded.
* ``model="<hub id or local path>"``: ``AutoModelForCausalLM`` / ``AutoTokenizer``
  ``.from_pretrained`` (optionally from a GGUF file).
* ``config={model_type: ..., sizes}``: the checkpoint's architecture. With ``model=None`` it builds a
  random model of that architecture with the offline tokenizer; under ``python -m avmt inspect``
  (:mod:`avmt.inspect`) a named checkpoint is built from it on the meta device, with the offline
  tokenizer standing in for the checkpoint's; when the checkpoint is loaded, every key written
  in it must equal the checkpoint's (:func:`avmt.inspect.check_written_config`).

The special tokens (``<video>``, ``<audio>``, ``<image>``, ``<seg>`` ...) are added to the
tokenizer with ids ``V .. V+n-1`` (V = the base tokenizer's size) and get NEW rows kept in small
separate parameters: :class:`SplitEmbedding` replaces the input embedding (ids below V use the
frozen base table, ids at/above V the new rows) and :class:`SplitLMHead` replaces the output
head (logits ``[..., V + n]``: the base head's first V columns and one column per new token, so
the model can also emit ``<seg>`` and labels may contain new tokens). For models with tied
input/output embeddings the new output rows are the new input rows.

Offline tokenizer text format: whitespace-separated words, every punctuation character and
every digit its own token, ``<tag>`` / ``</tag>`` one token each. A token that follows a space
carries a ``▁`` marker (``"▁dog"``), so ``decode(encode(text)) == text`` for any text whose
words are in the vocabulary, except that a leading space is dropped (so a generated answer
never starts with one) and tabs/CR read as spaces. Unknown words become ``<unk>``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avmt.errors import UserError

log = logging.getLogger(__name__)

SPACE = "\u2581"  # ▁, marks a token that follows a space
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
_BASE_SPECIALS = (UNK, PAD, BOS, EOS)
DEFAULT_SPECIAL_TOKENS = ["<video>", "<audio>", "<image>", "<seg>"]
# One pre-token: an optional ▁, then a <tag>/</tag>, a digit, a punctuation char or a run of letters.
_PIECE_PATTERN = SPACE + r"?(?:</?[A-Za-z_][A-Za-z0-9_]*>|[0-9]|[^\w\s" + SPACE + r"]|[^\W\d]+)|" + SPACE
_ARCHITECTURES = ("llama", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated"),
        ]
    )


def word_pieces(text: str) -> list[str]:
    """The offline tokenizer's pre-tokens of ``text`` without the space marker.

    ``"<range> 2,7 </range>"`` -> ``["<range>", "2", ",", "7", "</range>"]``.
    """
    pieces = [p for p, _ in _pre_tokenizer().pre_tokenize_str(text)]
    return [p[1:] if p.startswith(SPACE) else p for p in pieces if p not in (SPACE, "")]


def build_word_tokenizer(words: Iterable[str], exclude: Iterable[str] = ()):
    """Build the offline deterministic word-level tokenizer.

    Vocabulary (in this order): ``<unk> <pad> <s> </s>``, ``▁``, ``\\n``, the digits, the ASCII
    punctuation, then the sorted pieces of ``words`` (each word is split like text; a
    ``<tag>`` brings its ``</tag>`` and vice versa; a lowercase word brings its Capitalized
    form), each piece also in its ``▁``-prefixed form. ``exclude`` (e.g. the special tokens
    added afterwards) is left out. Same words -> same vocabulary and ids.

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` (bos ``<s>``, eos ``</s>``, pad ``<pad>``,
        unk ``<unk>``; encoding adds no bos/eos by itself).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    excluded = set(exclude) | set(_BASE_SPECIALS)
    fixed = list("0123456789") + list(string.punctuation)
    extra: set[str] = set()
    for word in words:
        for piece in word_pieces(str(word)):
            extra.add(piece)
            if piece.startswith("</") and piece.endswith(">"):
                extra.add("<" + piece[2:])
            elif piece.startswith("<") and piece.endswith(">") and len(piece) > 2:
                extra.add("</" + piece[1:])
            elif piece.isalpha() and piece.islower():
                extra.add(piece.capitalize())
    pieces = fixed + sorted(extra - set(fixed) - excluded)
    vocab: dict[str, int] = {}
    for tok in [*_BASE_SPECIALS, SPACE, "\n"]:
        vocab.setdefault(tok, len(vocab))
    for piece in pieces:
        if piece in excluded:
            continue
        vocab.setdefault(piece, len(vocab))
        vocab.setdefault(SPACE + piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Replace(Regex(r"[\t\r\f\v]"), " ")
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    backend.add_special_tokens(list(_BASE_SPECIALS))
    return _wrap_backend(backend)


def _wrap_backend(backend):
    """Wrap a ``tokenizers.Tokenizer`` of the offline format in a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def dataset_words(sources: Iterable[str]) -> list[str]:
    """The ``words`` listed by the manifests of converted datasets (folders or ``manifest.json`` paths).

    Raises:
        FileNotFoundError: a source has no manifest (names it).
        ValueError: a manifest is not a converted dataset's (it lists no words).
    """
    import json
    from pathlib import Path

    out: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        path = path / "manifest.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"model.llm.init_args.words_from: no manifest.json at '{path}' (a folder written by "
                                    f"python -m avmt data convert is expected)")
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("words"), list):
            raise UserError(f"model.llm.init_args.words_from: '{path}' is not a converted dataset's manifest (no words)")
        out.extend(str(word) for word in manifest["words"])
    return out


def _task_words() -> list[str]:
    """``avmt.tasks.all_words()``, imported lazily (the tasks package may not be importable yet)."""
    try:
        from avmt.tasks import all_words
    except ImportError as e:
        raise RuntimeError(
            "the offline tokenizer needs the task vocabulary (avmt.tasks.all_words), which is not "
            f"available ({e}); pass CausalLM(words=[...]) or name a pretrained model"
        ) from e
    return list(all_words())


def end_of_turn_token_id(tokenizer) -> int | None:
    """The token id that closes an assistant turn in ``tokenizer``'s chat template.

    Derived from the template itself: a one-turn conversation whose assistant message is a marker
    is rendered, and the first special (or added) token of the text after the marker is the end
    of turn (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``, a template that closes turns with
    ``</s>``: eos). Without a chat template, or when the template cannot be read that way (it
    raises, or renders no special token after the answer), it is the tokenizer's eos.
    """
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    marker = "avmt answer marker"
    question = [{"role": "user", "content": "avmt question marker"}]
    try:
        prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*question, {"role": "assistant", "content": marker}], tokenize=False, add_generation_prompt=False
        )
    except Exception as error:  # a template with requirements of its own (tools, strict roles, ...)
        log.warning("chat template could not render a one-turn conversation (%s); end of turn = eos", error)
        return eos
    answer_at = full.find(marker, len(prompt) if full.startswith(prompt) else 0)
    if answer_at < 0:
        log.warning("chat template does not render the assistant message verbatim; end of turn = eos")
        return eos
    closing = tokenizer(full[answer_at + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False)
    }
    for token_id in closing:
        if token_id in special:
            return int(token_id)
    log.warning("chat template closes the assistant turn with no special token (%r); end of turn = eos",
                full[answer_at + len(marker) :])
    return eos


# --------------------------------------------------------------------------- split embedding / head
class SplitEmbedding(nn.Module):
    """Input embedding = a frozen base table plus a small trainable table of new rows.

    Args:
        base: the model's embedding module (``nn.Embedding`` or a subclass); its weight is frozen.
        new_start: first id of the new rows (V, the base tokenizer's size; base rows at/above it
            are never used).
        num_new: n, number of new rows; initialized to the mean of the base rows ``[:new_start]``.

    Forward: ``input_ids [B, L]`` -> ``[B, L, D]``; ids < new_start read the base table, ids in
    ``[new_start, new_start + n)`` read ``new_rows [n, D]``.
    """

    def __init__(self, base: nn.Embedding, new_start: int, num_new: int) -> None:
        super().__init__()
        if new_start > base.weight.shape[0]:
            raise ValueError(
                f"new_start ({new_start}) exceeds the base embedding's {base.weight.shape[0]} rows"
            )
        self.base = base
        self.new_start = int(new_start)
        self.num_new = int(num_new)
        base.weight.requires_grad_(False)
        with torch.no_grad():
            mean = base.weight[: self.new_start].float().mean(dim=0, keepdim=True)
        self.new_rows = nn.Parameter(mean.repeat(self.num_new, 1).to(base.weight.dtype))

    @property
    def num_embeddings(self) -> int:
        """Total ids served: ``new_start + num_new``."""
        return self.new_start + self.num_new

    @property
    def embedding_dim(self) -> int:
        """D."""
        return int(self.base.weight.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The effective table ``[new_start + n, D]`` (a concatenation, for inspection)."""
        rows = self.new_rows.to(self.base.weight.dtype)
        return torch.cat([self.base.weight[: self.new_start], rows], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]`` -> embeddings ``[B, L, D]``."""
        is_new = input_ids >= self.new_start
        out = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        if self.num_new == 0 or not bool(is_new.any()):
            return out
        new_ids = torch.where(is_new, input_ids - self.new_start, torch.zeros_like(input_ids))
        new = F.embedding(new_ids, self.new_rows)
        scale = getattr(self.base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
        if scale is not None:
            new = new * scale
        return torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)

    def extra_repr(self) -> str:
        return f"new_start={self.new_start}, num_new={self.num_new}"


class SplitLMHead(nn.Module):
    """Output head over ``new_start + n`` ids: the frozen base head's first ``new_start`` columns
    plus one column per new token.

    Args:
        base: the model's output head (``nn.Linear`` ``D -> V_emb``); its weight is frozen.
        new_start: V (columns of the base head at/above it are dropped).
        num_new: n.
        tied: a :class:`SplitEmbedding` whose new rows are also the new output rows (models with
            tied embeddings); ``None`` = own ``new_rows [n, D]`` initialized to the mean of the
            base head rows.

    Forward: hidden ``[..., D]`` -> logits ``[..., new_start + n]``.
    """

    def __init__(
        self, base: nn.Module, new_start: int, num_new: int, tied: SplitEmbedding | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.new_start = int(new_start)
        self.num_new = int(num_new)
        base.weight.requires_grad_(False)
        # kept outside the module tree: the tied rows are registered (and saved) once, in the embedding
        object.__setattr__(self, "_tied", tied)
        if tied is None:
            with torch.no_grad():
                mean = base.weight[: self.new_start].float().mean(dim=0, keepdim=True)
            self.new_rows = nn.Parameter(mean.repeat(self.num_new, 1).to(base.weight.dtype))

    @property
    def out_rows(self) -> torch.Tensor:
        """The new output rows ``[n, D]``."""
        return self._tied.new_rows if self._tied is not None else self.new_rows

    @property
    def weight(self) -> torch.Tensor:
        """The effective head ``[new_start + n, D]`` (a concatenation, for inspection)."""
        rows = self.out_rows.to(self.base.weight.dtype)
        return torch.cat([self.base.weight[: self.new_start], rows], dim=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D]`` -> ``logits [..., new_start + n]``."""
        logits = self.base(hidden)[..., : self.new_start]
        if self.num_new == 0:
            return logits
        new = F.linear(hidden, self.out_rows.to(hidden.dtype))
        return torch.cat([logits, new.to(logits.dtype)], dim=-1)

    def extra_repr(self) -> str:
        return f"new_start={self.new_start}, num_new={self.num_new}, tied={self._tied is not None}"


# --------------------------------------------------------------------------- media layout
@dataclass(frozen=True)
class MediaSpan:
    """Where one placeholder's media tokens sit in a prompt (read by :meth:`CausalLM.position_ids`).

    A placeholder occurs in a prompt as blocks of ``segments * grid[0] * grid[1]`` consecutive
    copies of ``token_id``: segment-major, each segment's tokens row-major on its ``grid``.

    Attributes:
        token_id: the placeholder's id.
        kind: ``"video"``, ``"audio"`` or ``"image"``.
        segments: T, time segments of one block (1 for an image).
        grid: ``(rows, cols)`` of one segment's tokens; ``(1, n)`` when they have no spatial layout.
    """

    token_id: int
    kind: str
    segments: int
    grid: tuple[int, int]

    @property
    def block_length(self) -> int:
        """Tokens of one block: ``segments * rows * cols``."""
        return self.segments * self.grid[0] * self.grid[1]


# --------------------------------------------------------------------------- the plugin
class CausalLM(nn.Module):
    """A transformers causal LM with its tokenizer and trainable new special-token rows.

    Args:
        model: hub id or local path of a causal LM; ``None`` = tiny random config + offline tokenizer.
        architecture: tiny config family, ``"llama"`` or ``"qwen2"``.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
            max_position_embeddings: the tiny config (ignored when ``model`` is given);
            ``num_kv_heads=None`` = ``num_heads``.
        initializer_range: standard deviation of the tiny config's random weights (transformers'
            ``initializer_range``; ignored when ``model`` or ``config`` is given). The default 0.02 is
            sized for widths near 1,000: at width 128 every random projection shrinks its input about
            4x, so the frozen random layers pass little between positions until the adapter learns to;
            ``1 / sqrt(hidden_size)`` keeps the signal's scale through each projection.
        special_tokens: tokens added to the tokenizer, each one id, each with a new trainable row.
        gguf_file: GGUF file inside ``model`` to load weights and tokenizer from.
        torch_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or ``"auto"`` for a checkpoint).
        words: vocabulary of the offline tokenizer; ``None`` = ``avmt.tasks.all_words()``.
        words_from: converted datasets (their folders, or their ``manifest.json``) whose words
            (class names, questions, answers, expressions) join the offline tokenizer's vocabulary,
            so the tiny default LLM can read and write a real dataset's text. Ignored by a
            pretrained tokenizer (it already spells every word).
        train_modules: base modules trained in full next to the adapter (peft's ``modules_to_save``),
            by module name component, e.g. ``["embed_tokens", "lm_head", "norm"]``. Empty for a
            pretrained LLM; the tiny random default needs its vocabulary rows trained.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass
            instead of keeping them (transformers' gradient checkpointing, non-reentrant): less
            memory for a real LLM, about a third more compute.
        system_prompt: system message put before every prompt when the tokenizer has a chat
            template; ``None`` = the template's own default (e.g. SmolLM2's or Qwen2's built-in
            system message, none for Llama-3). Ignored without a chat template.
        config: the checkpoint's architecture, ``model_type`` plus the sizes that differ from that
            transformers config class's defaults (nested dicts for sub-configs). With ``model``: checked
            against the checkpoint when it is loaded, and what ``python -m avmt inspect`` builds
            instead of loading it. With ``model=None``: a randomly initialized model of that
            architecture with the offline tokenizer (its ``vocab_size`` becomes the tokenizer's size).
        base_dtype: keep the FROZEN base weights in this dtype (``"bfloat16"`` / ``"float16"``)
            while every trained parameter (new token rows, ``train_modules``, adapter parameters
            injected later) stays float32; the LLM then runs under ``torch.autocast`` to
            ``base_dtype``. ``None`` = no such split (``torch_dtype`` sets every weight's dtype,
            trained ones included). Needs ``torch_dtype="float32"``.

    Attributes:
        model: the transformers ``...ForCausalLM``; tokenizer: its tokenizer; pretrained: whether
        the weights came from a checkpoint; stand_in_tokenizer: whether the offline tokenizer stands in
        for a named checkpoint's (inspect builds); new_token_ids: ids with new rows;
        end_of_turn_id: the id that closes an assistant turn in the chat template (the tokenizer's
        eos without a template): training targets end with it; stop_token_ids: ids that end
        generation (end of turn, then eos when it differs).
    """

    def __init__(
        self,
        model: str | None = None,
        architecture: str = "llama",
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int = 256,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        special_tokens: list[str] = DEFAULT_SPECIAL_TOKENS,
        gguf_file: str | None = None,
        torch_dtype: str = "float32",
        words: list[str] | None = None,
        words_from: list[str] = [],  # noqa: B006
        train_modules: list[str] = [],  # noqa: B006
        gradient_checkpointing: bool = False,
        system_prompt: str | None = None,
        base_dtype: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from avmt.inspect import building_without_weights

        if base_dtype is not None:
            if base_dtype not in _DTYPES or base_dtype == "float32":
                raise UserError(
                    f"llm.base_dtype: {base_dtype!r} is not a reduced precision dtype; use bfloat16 or float16 (or null)"
                )
            if torch_dtype != "float32":
                raise UserError(
                    f"llm.base_dtype ({base_dtype}) keeps trained weights in float32 and needs torch_dtype: float32, "
                    f"got torch_dtype: {torch_dtype}; set one of the two"
                )
            torch_dtype = base_dtype  # the frozen base is built/loaded in it; trained parts are cast back below
        self.base_dtype = base_dtype
        self.system_prompt = system_prompt
        self.train_modules = list(train_modules)
        special_tokens = list(dict.fromkeys(special_tokens))
        self.model_name = model
        self.gguf_file = gguf_file
        self.special_tokens = special_tokens
        offline = model is None or building_without_weights()
        self.stand_in_tokenizer = model is not None and offline
        if offline:
            vocabulary = [*(_task_words() if words is None else words), *dataset_words(words_from)]
            tokenizer = build_word_tokenizer(vocabulary, exclude=special_tokens)
        if model is None and config is None:
            if architecture not in _ARCHITECTURES:
                raise UserError(
                    f"unknown architecture {architecture!r}; choose one of {', '.join(_ARCHITECTURES)}"
                )
            _check_dtype(torch_dtype)
            self.model = _tiny_model(
                architecture,
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings,
                initializer_range=initializer_range,
                tokenizer=tokenizer,
            )
            if torch_dtype != "auto":
                self.model.to(_DTYPES[torch_dtype])
            self.pretrained = False
        else:
            random_vocab = len(tokenizer) if model is None else None
            loaded, self.model = self.load_checkpoint(model, gguf_file, torch_dtype, config, random_vocab)
            if not offline:
                tokenizer = loaded
            # from_pretrained returns the model in eval mode and Lightning keeps submodule modes, so
            # without this the adapter's dropout (and the base's own) would never be active in fit.
            self.model.train()
            self.pretrained = model is not None
        self.tokenizer = tokenizer
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._install_new_tokens(special_tokens)
        self.end_of_turn_id = end_of_turn_token_id(self.tokenizer)
        stops = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        self.stop_token_ids: list[int] = list(dict.fromkeys(int(i) for i in stops if i is not None))
        if len(self.stop_token_ids) > 1:
            self.model.generation_config.eos_token_id = list(self.stop_token_ids)
        if base_dtype is not None:
            self._keep_trained_float32()

    # ----------------------------------------------------------------- setup
    def _install_new_tokens(self, special_tokens: list[str]) -> None:
        """Add the special tokens (and a pad token if missing); swap in the split embedding/head."""
        tok = self.tokenizer
        emb = self.model.get_input_embeddings()
        rows = emb.weight.shape[0]
        self.base_vocab_size = len(tok)
        if self.base_vocab_size > rows:
            raise ValueError(
                f"tokenizer has {self.base_vocab_size} tokens but the model only {rows} embedding rows"
            )
        new = [t for t in special_tokens if t not in tok.get_vocab()]
        existing = sorted(set(special_tokens) - set(new))
        if existing:
            log.warning("tokens %s already in the tokenizer: they keep their base (frozen) rows", existing)
        pad_missing = tok.pad_token is None
        if pad_missing:
            fallback = tok.unk_token or tok.eos_token
            if fallback is not None:
                tok.pad_token = fallback
            else:
                new.append("<pad>")
        if new:
            from tokenizers import AddedToken

            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
        if pad_missing and tok.pad_token is None:
            tok.pad_token = "<pad>"
        ids = tok.convert_tokens_to_ids(new)
        if ids != list(range(self.base_vocab_size, self.base_vocab_size + len(new))):
            raise RuntimeError(
                f"new tokens {new} got ids {ids}, expected consecutive ids from {self.base_vocab_size}"
            )
        self.new_token_ids = ids
        split = SplitEmbedding(emb, self.base_vocab_size, len(new))
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        self.model.set_input_embeddings(split)
        if head is not None:
            split_head = SplitLMHead(head, self.base_vocab_size, len(new), split if tied else None)
            self.model.set_output_embeddings(split_head)
        total = self.base_vocab_size + len(new)
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.vocab_size = total
        config.vocab_size = total
        for cfg in (config, self.model.generation_config):
            cfg.pad_token_id = tok.pad_token_id
            if tok.eos_token_id is not None:
                cfg.eos_token_id = tok.eos_token_id
        new_params = {id(p) for p in self.new_parameters}
        # The parameters of the model as built: freeze_base freezes exactly these (not adapters added later).
        self._base_params = [p for p in self.model.parameters() if id(p) not in new_params]
        self._base_param_ids = {id(p) for p in self._base_params}

    # ----------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        """D, the LLM's hidden width."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Ids the model embeds and predicts (base vocabulary + new tokens)."""
        return self.base_vocab_size + len(self.new_token_ids)

    @property
    def new_parameters(self) -> list[nn.Parameter]:
        """The new token rows (input, and output when not tied)."""
        params = [self.model.get_input_embeddings().new_rows]
        head = self.model.get_output_embeddings()
        if isinstance(head, SplitLMHead) and head._tied is None:
            params.append(head.new_rows)
        return params

    def placeholder_id(self, token: str) -> int:
        """The single id of ``token`` (e.g. ``"<video>"``); ValueError when it is not one token."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise UserError(
                f"{token!r} is not a token of this LLM's tokenizer; special tokens: {self.special_tokens}"
            )
        return int(tid)

    def load_checkpoint(
        self, model: str | None, gguf_file: str | None, torch_dtype: str, config: dict[str, Any] | None = None,
        random_vocab: int | None = None,
    ):
        """``(tokenizer, transformers model)`` of the checkpoint ``model`` (hub id or local path), or
        ``(None, model built from config)`` (``model=None``, or an inspect build).

        Called once by ``__init__`` when ``model`` or ``config`` is given; a plugin for another model
        family overrides it (e.g. :class:`avmt.omni.QwenOmniLM` takes Qwen2.5-Omni's thinker).

        Args:
            config: the ``config`` init arg (the architecture).
            random_vocab: with ``model=None``: the offline tokenizer's size, the random model's ``vocab_size``.
        """
        return _load_pretrained(model, gguf_file, torch_dtype, config, random_vocab)

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media_layout: Mapping[str, MediaSpan]
    ) -> torch.Tensor | None:
        """Position ids of a batch whose media tokens sit where ``media_layout`` says.

        Args:
            input_ids: ``long [B, L]`` with each placeholder expanded to its blocks.
            attention_mask: ``[B, L]`` (1 = token, 0 = padding; left or right padding).
            media_layout: placeholder -> :class:`MediaSpan`.
        Returns:
            ``None`` (this default): the model numbers the tokens itself (ordinary 1-D positions).
            An LLM with multimodal rotary positions returns e.g. ``long [3, B, L]`` (Qwen2.5-Omni's
            TMRoPE); :class:`~avmt.model.AVModel` passes it to :meth:`forward` and :meth:`generate`,
            where the ids of generated tokens continue from the last prompt token's ids + 1.
        """
        return None

    # ----------------------------------------------------------------- compute
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: ``input_ids [B, L]`` -> ``[B, L, D]``."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Run the LM on embeddings.

        Args:
            inputs_embeds: ``[B, L, D]``.
            attention_mask: ``[B, L]`` (1 = token, 0 = padding).
            labels: ``[B, L]`` ids with -100 where no loss is taken (shifted inside), or None.
            kwargs: passed to the transformers model (e.g. ``output_hidden_states=True``).
        Returns:
            the transformers ``CausalLMOutputWithPast``: ``logits [B, L, vocab_size]``, ``loss``
            (mean over labelled tokens) when labels are given.
        """
        kwargs.setdefault("use_cache", False)
        with self._compute_precision(inputs_embeds.device):
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _compute_precision(self, device: torch.device):
        """``torch.autocast`` to ``base_dtype`` when the frozen base is kept in it (float32 trained weights
        meet reduced precision base weights there), else a no-op context. In ``base_dtype`` mode it first
        makes every trained parameter float32 (:meth:`_keep_trained_float32`)."""
        import contextlib

        if self.base_dtype is None:
            return contextlib.nullcontext()
        # adapters are injected after construction, with parameters in the base's dtype: float32 them first
        self._keep_trained_float32()
        return torch.autocast(device_type=device.type, dtype=_DTYPES[self.base_dtype])

    def _keep_trained_float32(self) -> None:
        """``base_dtype`` mode: cast to float32 every trained parameter that is not (new token rows,
        parameters injected after construction such as adapters, and, once :meth:`freeze_base` ran,
        the ``train_modules``). The Parameter objects stay the same (optimizers keep their references)."""
        base = self._base_param_ids
        frozen = getattr(self, "_base_frozen", False)
        for p in self.model.parameters():
            if not p.is_floating_point() or p.dtype == torch.float32:
                continue
            if id(p) not in base or (frozen and p.requires_grad):
                p.data = p.data.float()

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ):
        """Greedy decoding from embeddings (transformers ``generate`` with ``inputs_embeds``).

        Args:
            inputs_embeds: ``[B, L, D]`` prompts, LEFT-padded.
            attention_mask: ``[B, L]``.
            max_new_tokens: generation length limit; rows stop at eos (then padded with pad).
            kwargs: passed to ``generate`` (e.g. ``return_dict_in_generate=True``).
        Returns:
            ``[B, N]`` new token ids (N <= max_new_tokens), or the generate output object when
            ``return_dict_in_generate=True``. A row stops at any of :attr:`stop_token_ids` (the
            chat template's end of turn, and eos).
        """
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("num_beams", 1)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        stops = self.stop_token_ids
        kwargs.setdefault("eos_token_id", (stops[0] if len(stops) == 1 else list(stops)) if stops else None)
        if not kwargs["do_sample"]:  # silence warnings about a checkpoint's sampling defaults
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        with self._compute_precision(inputs_embeds.device):
            return self.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                **kwargs,
            )

    def freeze_base(self) -> None:
        """Freeze every parameter of the model as built except the new token rows.

        Parameters injected later (adapters) are not touched, so the order of freeze_base and
        adapter injection does not matter. With ``base_dtype`` the ``train_modules`` become float32.
        """
        for p in self._base_params:
            p.requires_grad_(False)
        for p in self.new_parameters:
            p.requires_grad_(True)
        base = {id(p) for p in self._base_params}
        for wanted in self.train_modules:
            matched = [
                p
                for name, p in self.model.named_parameters()
                if id(p) in base and wanted in name.split(".")[:-1]
            ]
            if not matched:
                names = sorted({part for name, _ in self.model.named_parameters() for part in name.split(".")[:-1]
                                if not part.isdigit()})
                raise UserError(f"llm.train_modules: {wanted!r} names no module of the LLM; module names: {', '.join(names)}")
            for p in matched:
                p.requires_grad_(True)
        self._base_frozen = True
        if self.base_dtype is not None:
            self._keep_trained_float32()

    # ----------------------------------------------------------------- tokenizer state
    def tokenizer_state(self) -> dict[str, Any]:
        """A JSON-able description from which :meth:`tokenizer_from_state` rebuilds this tokenizer.

        Offline tokenizer: its full ``tokenizer.json`` string. Pretrained: the name/path, GGUF
        file, the added tokens in order, the pad token and the resulting size.
        """
        tok = self.tokenizer
        if not self.pretrained:
            return {"kind": "word_level", "tokenizer_json": tok.backend_tokenizer.to_str()}
        added = [tok.convert_ids_to_tokens(i) for i in range(self.base_vocab_size, len(tok))]
        return {
            "kind": "pretrained",
            "name_or_path": self.model_name,
            "gguf_file": self.gguf_file,
            "added_tokens": added,
            "pad_token": tok.pad_token,
            "vocab_size": len(tok),
        }

    @staticmethod
    def tokenizer_from_state(state: dict[str, Any]):
        """Rebuild the exact tokenizer described by :meth:`tokenizer_state` (same tokens, same ids)."""
        kind = state.get("kind")
        if kind == "word_level":
            from tokenizers import Tokenizer

            return _wrap_backend(Tokenizer.from_str(state["tokenizer_json"]))
        if kind == "pretrained":
            from tokenizers import AddedToken
            from transformers import AutoTokenizer

            kwargs = {"gguf_file": state["gguf_file"]} if state.get("gguf_file") else {}
            tok = AutoTokenizer.from_pretrained(state["name_or_path"], **kwargs)
            if state["added_tokens"]:
                added = [AddedToken(t, special=False, normalized=False) for t in state["added_tokens"]]
                tok.add_tokens(added)
            tok.pad_token = state["pad_token"]
            if len(tok) != state["vocab_size"]:
                raise UserError(
                    f"tokenizer {state['name_or_path']!r} rebuilt with {len(tok)} tokens, "
                    f"expected {state['vocab_size']}"
                )
            return tok
        raise ValueError(f"unknown tokenizer state kind {kind!r}")


def tokenizer_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Why two :meth:`CausalLM.tokenizer_state` s differ, in a few words (for error messages).

    For the offline word-level tokenizer: the words added and removed (a changed task set changes
    the vocabulary, and with it the ids of the tiny LLM's rows); for pretrained ones, the fields
    that differ.
    """
    if saved.get("kind") == current.get("kind") == "word_level":
        import json

        def words(state: dict[str, Any]) -> set[str]:
            vocab = json.loads(state["tokenizer_json"])["model"]["vocab"]
            return {token.lstrip(SPACE) for token in vocab} - {""}

        old, new = words(saved), words(current)
        added, removed = sorted(new - old), sorted(old - new)
        if added or removed:
            return (
                f"the offline vocabulary changed: {len(added)} word(s) added {added[:10]}, {len(removed)} removed "
                f"{removed[:10]}; the tasks' words were changed or tasks were added since the checkpoint was "
                "written, which moves the ids of the tiny LLM's rows"
            )
        return "the offline vocabulary holds the same words in another order or with other special tokens"
    fields = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    return f"tokenizer fields differ: {fields}"


def _tiny_model(
    architecture: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int,
    max_position_embeddings: int,
    tokenizer,
    initializer_range: float,
) -> nn.Module:
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (torch RNG: deterministic under a seed); its
    weights are drawn with standard deviation ``initializer_range``."""
    if not initializer_range > 0:
        raise UserError(f"model.llm.init_args.initializer_range must be > 0, got {initializer_range!r}")
    if hidden_size % num_heads != 0:
        raise UserError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv != 0:
        raise UserError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv})")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=float(initializer_range),
    )
    if architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**common))


def _check_dtype(torch_dtype: str) -> None:
    if torch_dtype != "auto" and torch_dtype not in _DTYPES:
        raise UserError(f"unknown torch_dtype {torch_dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")


#: the YAML key of the LLM's architecture (named in errors)
CONFIG_KEY = "model.llm.init_args.config"


def built_from_config(config: dict[str, Any] | None, model: str | None, random_vocab: int | None):
    """The transformers config a model is built from instead of loaded (:meth:`CausalLM.load_checkpoint`).

    Args:
        config: the ``config`` init arg; an inspect build of a named checkpoint requires it.
        model: the named checkpoint, or None (random weights).
        random_vocab: the ``vocab_size`` of the text config when not None.
    """
    from avmt.inspect import config_from_dict

    built = config_from_dict(config, CONFIG_KEY, model)
    if random_vocab is not None:
        built.get_text_config().vocab_size = int(random_vocab)
    return built


def _load_pretrained(
    model: str | None, gguf_file: str | None, torch_dtype: str, config: dict[str, Any] | None = None,
    random_vocab: int | None = None,
):
    """``AutoTokenizer`` + ``AutoModelForCausalLM`` from a hub id / local path (optionally a GGUF file),
    the written ``config`` checked against the checkpoint's; or ``(None, AutoModelForCausalLM.from_config)``
    of ``config`` for ``model=None`` (random weights) and inspect builds (on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from avmt.inspect import building_without_weights, check_written_config

    _check_dtype(torch_dtype)
    dtype = torch_dtype if torch_dtype == "auto" else _DTYPES[torch_dtype]
    if model is None or building_without_weights():
        built = built_from_config(config, model, random_vocab)
        return None, AutoModelForCausalLM.from_config(built, dtype=torch.float32 if dtype == "auto" else dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    expected = ("a hub id or a local directory with a transformers checkpoint is expected; "
                "set it to null for the tiny offline LLM")
    if _names_a_local_path(model) and not Path(model).expanduser().exists():
        # a FileNotFoundError (an OSError, as transformers raises): the CLI reports it in one line, exit 2
        raise FileNotFoundError(f"model.llm.init_args.model: could not load the LLM {model!r}: no such directory "
                                f"({expected})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
        checkpoint_config = AutoConfig.from_pretrained(model, **kwargs) if config is not None else None
    except OSError as e:
        reason = " ".join(str(e).split())
        raise UserError(f"model.llm.init_args.model: could not load the LLM {model!r} ({expected}): {reason}") from e
    check_written_config(config, checkpoint_config, CONFIG_KEY, model)
    return tokenizer, lm


def _names_a_local_path(model: str) -> bool:
    """Whether ``model`` can only be a local path, not a hub id (``org/name``)."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or "\\" in model
