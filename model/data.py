"""Story corpora: where the text comes from, a tokenized cache on disk, and batches for training/evaluation.

Sources (see :func:`resolve_data_source`):

* ``"tinystories"``: the folder named by ``$STORYFORGE_DATA_DIR`` (``train.txt``/``valid.txt``/``test.txt``) if
  set, otherwise the hub dataset ``roneneldan/TinyStories`` (files ``TinyStoriesV2-GPT4-{train,valid}.txt``);
* a ``.txt`` file in that format (stories separated by ``<|endoftext|>`` lines);
* a ``.jsonl`` file with one story per line in a ``text`` or ``story`` field;
* a folder of such files.

Token cache layout (one folder per (source, tokenizer) pair, under ``$STORYFORGE_CACHE_DIR`` or
``~/.cache/storyforge/tokens``):

* ``tokens.bin``: all documents as one flat array ``[BOS] story [EOS] [BOS] story [EOS] ...`` (BOS left out when
  the tokenizer has none), in ``uint16`` when every id fits, else ``uint32``;
* ``doc_offsets.bin``: ``int64`` start offset of each document, plus a final entry equal to the token count,
  so document ``i`` is ``tokens[off[i]:off[i+1]]``;
* ``meta.json``: dtype, counts, UTF-8 byte count of the text (for bits per byte), source, tokenizer.

The dtype is read back from ``meta.json`` and the file sizes are checked, so ids can never be reinterpreted
in the wrong width.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the batch functions; keep `import model.data` light
    import torch

    from model.tokenizer import Tokenizer

DATA_DIR_ENV = "STORYFORGE_DATA_DIR"
CACHE_DIR_ENV = "STORYFORGE_CACHE_DIR"
HUB_REPO_ID = "roneneldan/TinyStories"
HUB_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}
TINYSTORIES_NAMES = {"tinystories", "roneneldan/tinystories", "hub:tinystories"}
STORY_SEPARATOR = "<|endoftext|>"
DATA_SUFFIXES = (".txt", ".jsonl")
CACHE_FORMAT_VERSION = 1
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

_SPLIT_ALIASES = {
    "train": "train",
    "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
    "test": "test",
}


class DataError(RuntimeError):
    """Data could not be found, read or cached; the message says what to do."""


class DataSourceUnavailable(DataError):
    """The hub could not be reached (offline) and the file is not in the local hub cache."""


# ------------------------------------------------------------------------------------------- sources


def normalize_split(split: str) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` (accepts ``validation``/``val``/``dev``)."""
    try:
        return _SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise DataError(f"Unknown split {split!r}; use train, valid or test.") from None


def _data_files(directory: Path) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DataError(f"No .txt or .jsonl story files in {directory}.")
    return files


def _iter_txt(path: Path) -> Iterator[str]:
    """Stories from a TinyStories-format text file, read line by line (memory bounded by one story)."""
    buf: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if STORY_SEPARATOR in line:
                *before, rest = line.split(STORY_SEPARATOR)
                for part in before:
                    buf.append(part)
                    doc = "".join(buf).strip()
                    buf = []
                    if doc:
                        yield doc
                buf.append(rest)
            else:
                buf.append(line)
    doc = "".join(buf).strip()
    if doc:
        yield doc


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}).") from None
            text = None
            if isinstance(record, dict):
                text = record.get("text", record.get("story"))
            elif isinstance(record, str):
                text = record
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: expected an object with a 'text' or 'story' string field.")
            text = text.strip()
            if text:
                yield text


def iter_documents(source: str | Path) -> Iterator[str]:
    """Stream the stories of a ``.txt``/``.jsonl`` file or a folder of them, one stripped story at a time."""
    path = Path(source).expanduser()
    if path.is_dir():
        for file in _data_files(path):
            yield from iter_documents(file)
        return
    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".txt":
        yield from _iter_txt(path)
    else:
        raise DataError(f"Unsupported data file {path}: use .txt (stories separated by {STORY_SEPARATOR} "
                        "lines) or .jsonl (a 'text' or 'story' field per line).")


def _split_file_in_dir(directory: Path, split: str) -> Path | None:
    names = [k for k, v in _SPLIT_ALIASES.items() if v == split]
    for name in names:
        for stem in (name, f"TinyStoriesV2-GPT4-{name}", f"TinyStories-{name}"):
            for suffix in DATA_SUFFIXES:
                candidate = directory / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _local_alternative_hint() -> str:
    return (f"Use a local copy instead: pass --data path/to/train.txt (stories separated by {STORY_SEPARATOR} "
            f"lines, or a .jsonl), or set {DATA_DIR_ENV} to a folder with train.txt/valid.txt/test.txt.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP check of the hub endpoint, so that offline we fail at once instead of after retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy is in use: a direct connection test says nothing
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_tinystories(split: str = "train") -> Path:
    """Path of a TinyStories V2 split from the hub (downloaded once into the huggingface_hub cache).

    Offline (``HF_HUB_OFFLINE`` set, or the hub unreachable) the cached copy is used if there is one;
    otherwise this raises :class:`DataSourceUnavailable` at once, naming the local alternatives.
    """
    split = normalize_split(split)
    if split not in HUB_FILES:
        raise DataError(f"The hub's TinyStories has no {split!r} split (only train and valid). "
                        + _local_alternative_hint())
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    filename = HUB_FILES[split]
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        cached = try_to_load_from_cache(HUB_REPO_ID, filename, repo_type="dataset")
        if isinstance(cached, str):
            return Path(cached)
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise DataSourceUnavailable(f"Cannot download {HUB_REPO_ID}/{filename}: {why}. " + _local_alternative_hint())
    try:
        return Path(hf_hub_download(HUB_REPO_ID, filename, repo_type="dataset"))
    except Exception as exc:  # connection errors, HTTP errors, LocalEntryNotFoundError, disk errors
        raise DataSourceUnavailable(f"Downloading {HUB_REPO_ID}/{filename} failed ({type(exc).__name__}: "
                                    f"{exc}). " + _local_alternative_hint()) from exc


def resolve_data_source(name_or_path: str | Path, split: str = "train") -> Path:
    """Turn a data argument into a local file or folder for ``split``.

    ``"tinystories"`` means ``$STORYFORGE_DATA_DIR/{split}.txt`` if that variable is set, else the hub download.
    A folder holding split files (``train.txt``, ``valid.txt``/``validation.txt``, ``test.txt``, or
    ``TinyStoriesV2-GPT4-*.txt``) gives the file of that split; a folder without split files is used whole
    for ``train`` only. A file is used as given.
    """
    split = normalize_split(split)
    if str(name_or_path).lower() in TINYSTORIES_NAMES:
        env = os.environ.get(DATA_DIR_ENV)
        if env:
            directory = Path(env).expanduser()
            found = _split_file_in_dir(directory, split) if directory.is_dir() else None
            if found is None:
                raise DataError(f"{DATA_DIR_ENV}={env} has no {split}.txt (or .jsonl). "
                                "Point it at a folder with train.txt/valid.txt/test.txt.")
            return found
        return download_tinystories(split)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(f"Data not found: {path}. Give a .txt/.jsonl file, a folder of them, or 'tinystories'.")
    if path.is_dir():
        found = _split_file_in_dir(path, split)
        if found is not None:
            return found
        if split == "train":
            _data_files(path)  # raises if the folder holds no data files
            return path
        raise DataError(f"{path} has no {split} file ({split}.txt or .jsonl); pass the {split} data explicitly.")
    return path


# ------------------------------------------------------------------------------------------- token cache


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "storyforge" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id below ``vocab_size``."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size={vocab_size} does not fit in uint32")


def _source_files(source: Path) -> list[Path]:
    return _data_files(source) if source.is_dir() else [source]


def _cache_key(source: Path, tokenizer: Tokenizer) -> tuple[str, dict[str, Any]]:
    files = []
    for f in _source_files(source):
        st = f.stat()
        files.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    ident = {
        "format_version": CACHE_FORMAT_VERSION,
        "files": files,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return digest, ident


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60]


@dataclass
class TokenCache:
    """A built token cache, memory-mapped read-only.

    ``tokens``: flat id array (dtype from ``meta.json``); ``doc_offsets``: int64 ``[num_documents + 1]``.
    """

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray
    doc_offsets: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        """Open and verify a cache folder (dtype from meta.json, file sizes checked)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{path} is not a token cache (no meta.json); build it with build_token_cache().")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path} is corrupt ({exc}); delete {path} to rebuild it.") from exc
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise DataError(f"{path} has cache format {meta.get('format_version')}, expected "
                            f"{CACHE_FORMAT_VERSION}; delete it to rebuild.")
        dtype_name = meta.get("dtype")
        if dtype_name not in ("uint16", "uint32"):
            raise DataError(f"{meta_path}: unsupported dtype {dtype_name!r}; delete {path} to rebuild.")
        dtype = np.dtype(dtype_name)
        count, n_docs = int(meta["token_count"]), int(meta["document_count"])
        tok_file, off_file = path / "tokens.bin", path / "doc_offsets.bin"
        for file, expected, what in ((tok_file, count * dtype.itemsize, f"{count} x {dtype_name}"),
                                     (off_file, (n_docs + 1) * 8, f"{n_docs + 1} x int64")):
            size = file.stat().st_size if file.is_file() else -1
            if size != expected:
                raise DataError(f"Token cache {path} is inconsistent: {file.name} has {size} bytes, expected "
                                f"{expected} ({what}, from meta.json). Delete the folder to rebuild it.")
        tokens = np.memmap(tok_file, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)
        offsets = np.fromfile(off_file, dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != count or (np.diff(offsets) < 0).any():
            raise DataError(f"Token cache {path}: doc_offsets.bin is corrupt; delete the folder to rebuild it.")
        return cls(path=path, meta=meta, tokens=tokens, doc_offsets=offsets)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets.shape[0] - 1)

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the stories the tokens encode (for bits-per-byte)."""
        return int(self.meta["text_bytes"])

    def document(self, index: int) -> np.ndarray:
        """Tokens of document ``index`` (including its BOS/EOS)."""
        return self.tokens[self.doc_offsets[index]:self.doc_offsets[index + 1]]

    def iter_documents(self) -> Iterator[np.ndarray]:
        for i in range(self.num_documents):
            yield self.document(i)


def build_token_cache(
    source: str | Path,
    tokenizer: Tokenizer,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
    docs_per_chunk: int = 2048,
) -> Path:
    """Tokenize ``source`` once into a cache folder and return its path; reuse it on later calls.

    The folder is keyed by (source files' paths, sizes and mtimes, tokenizer fingerprint), so editing the
    data or changing tokenizer builds a new one. Documents are tokenized ``docs_per_chunk`` at a time and
    appended to disk, so memory stays bounded whatever the corpus size. The build happens in a temporary
    folder renamed into place at the end: an interrupted build never leaves a valid-looking cache.
    """
    from tqdm.auto import tqdm

    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"Data not found: {source}")
    if tokenizer.eos_id is None:
        raise DataError(f"Tokenizer {tokenizer.name} has no EOS id; stories need an end-of-text token.")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key, ident = _cache_key(source, tokenizer)
    final = cache_dir / f"{_safe_name(source.stem)}-{_safe_name(tokenizer.name)}-{key}"
    if final.exists():
        try:
            cache = TokenCache.open(final)
            if cache.meta.get("key") == key:
                return final
        except DataError as exc:
            print(f"warning: rebuilding token cache: {exc}", file=sys.stderr)
        shutil.rmtree(final, ignore_errors=True)

    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    total_bytes = sum(f.stat().st_size for f in _source_files(source))
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    suffix = [tokenizer.eos_id]
    count = n_docs = text_bytes = 0
    try:
        with open(tmp / "tokens.bin", "wb") as tok_f, open(tmp / "doc_offsets.bin", "wb") as off_f, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {source.name}",
                     disable=not progress, file=sys.stderr) as bar:

            def flush(docs: list[str]) -> None:
                nonlocal count, n_docs
                encoded = tokenizer.encode_batch(docs)
                lengths = np.fromiter((len(ids) + len(prefix) + 1 for ids in encoded), dtype=np.int64,
                                      count=len(encoded))
                starts = count + np.concatenate(([0], np.cumsum(lengths)[:-1]))
                flat = np.fromiter((t for ids in encoded for t in (*prefix, *ids, *suffix)), dtype=np.int64,
                                   count=int(lengths.sum()))
                if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
                    raise DataError(f"Tokenizer {tokenizer.name} produced an id outside [0, "
                                    f"{tokenizer.vocab_size}); the cache would be wrong.")
                flat.astype(dtype).tofile(tok_f)
                starts.astype(np.int64).tofile(off_f)
                count += int(flat.size)
                n_docs += len(docs)

            batch: list[str] = []
            batch_bytes = 0
            for doc in iter_documents(source):
                batch.append(doc)
                nbytes = len(doc.encode("utf-8"))
                text_bytes += nbytes
                batch_bytes += nbytes
                if len(batch) >= docs_per_chunk:
                    flush(batch)
                    bar.update(batch_bytes)
                    batch, batch_bytes = [], 0
            if batch:
                flush(batch)
            bar.update(max(0, total_bytes - bar.n))
            np.array([count], dtype=np.int64).tofile(off_f)

        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "dtype": dtype.name,
            "token_count": count,
            "document_count": n_docs,
            "text_bytes": text_bytes,
            "source": str(source.resolve()),
            "source_files": ident["files"],
            "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "layout": "[BOS] story [EOS] per document, BOS omitted when the tokenizer has none",
            "build_seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():  # lost a race with another builder: theirs is as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_token_cache(
    source: str | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None, *, progress: bool = True
) -> TokenCache:
    """:func:`build_token_cache` (or reuse) then :meth:`TokenCache.open`."""
    return TokenCache.open(build_token_cache(source, tokenizer, cache_dir, progress=progress))


# ------------------------------------------------------------------------------------------- batches


def _as_array(tokens: TokenCache | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tokens, TokenCache):
        return tokens.tokens
    if isinstance(tokens, np.ndarray):
        return tokens
    return tokens.detach().cpu().numpy()


def _windows(arr: np.ndarray, starts: Sequence[int], length: int) -> np.ndarray:
    return np.stack([np.asarray(arr[s:s + length], dtype=np.int64) for s in starts])


def _to_xy(win: np.ndarray, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    xy = torch.from_numpy(win)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def random_batches(
    tokens: TokenCache | np.ndarray | torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of random windows: ``x``, ``y`` LongTensors ``[B, T]`` with ``y[:, t] = x[:, t+1]``.

    Window starts are drawn with ``torch.randint(..., generator=generator)`` and nothing else, so the batch
    sequence is fully determined by the generator state (save ``generator.get_state()`` to resume exactly).
    Windows may cross story boundaries (the EOS/BOS tokens between stories are learnt that way).
    """
    import torch

    arr = _as_array(tokens)
    n = int(arr.shape[0])
    if n < block_size + 1:
        raise DataError(f"Only {n} tokens: need at least block_size + 1 = {block_size + 1} for one window.")
    starts = torch.randint(0, n - block_size, (batch_size,), generator=generator).tolist()
    return _to_xy(_windows(arr, starts, block_size + 1), device)


def eval_batches(
    tokens: TokenCache | np.ndarray | torch.Tensor,
    batch_size: int,
    block_size: int,
    max_batches: int | None = None,
    device: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic pass over non-overlapping windows ``tokens[i*T : i*T+T+1]`` in order.

    Every target token is scored exactly once (except the trailing ``< T`` tokens). The last batch may have
    fewer than ``batch_size`` rows. ``max_batches`` stops early.
    """
    arr = _as_array(tokens)
    n = int(arr.shape[0])
    starts = list(range(0, n - block_size, block_size))
    for b, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _to_xy(_windows(arr, starts[i:i + batch_size], block_size + 1), device)


class DocumentBatch(NamedTuple):
    """``x``/``y`` LongTensors ``[B, T]`` (padded targets are ``IGNORE_INDEX``), ``reset`` bool ``[B]``."""

    x: torch.Tensor
    y: torch.Tensor
    reset: torch.Tensor


class DocumentChunkIterator:
    """B parallel streams, each walking documents in consecutive ``block_size`` chunks.

    Used for a model that carries state (a memory) from one chunk to the next: ``reset[b]`` is True when
    stream ``b`` starts a new document at this chunk (clear its state first). Chunks are aligned to the
    document start; the last chunk of a document is padded with ``pad_id`` in ``x`` and ``IGNORE_INDEX`` in
    ``y``. Documents are taken in order, or shuffled per epoch when ``seed`` is given. With ``loop=False``
    streams that run out of documents yield fully padded rows (``reset=True``) until all are done.

    The position is tiny and serialisable: ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(
        self,
        cache: TokenCache,
        batch_size: int,
        block_size: int,
        *,
        seed: int | None = None,
        loop: bool = False,
        pad_id: int | None = None,
        device: Any = None,
    ) -> None:
        self.tokens, self.offsets = cache.tokens, cache.doc_offsets
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.loop, self.device = seed, loop, device
        eos = cache.meta.get("eos_id")
        self.pad_id = pad_id if pad_id is not None else (eos if eos is not None else 0)
        lengths = np.diff(self.offsets)
        if not (lengths >= 2).any():
            raise DataError("No document has 2 or more tokens; nothing to train on.")
        self._n_docs = int(lengths.shape[0])
        self.epoch = 0
        self.cursor = 0
        # per stream: [document index, position] ; doc -1 = needs a new document ; -2 = finished
        self.streams = [[-1, 0] for _ in range(batch_size)]
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(0)

    def _order_for_epoch(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.seed is None:
                self._order = np.arange(self._n_docs)
            else:
                import torch

                g = torch.Generator().manual_seed(int(self.seed) + self.epoch)
                self._order = torch.randperm(self._n_docs, generator=g).numpy()
            self._order_epoch = self.epoch
        return self._order

    def _next_doc(self) -> int | None:
        while True:
            if self.cursor >= self._n_docs:
                if not self.loop:
                    return None
                self.epoch += 1
                self.cursor = 0
            d = int(self._order_for_epoch()[self.cursor])
            self.cursor += 1
            if self.offsets[d + 1] - self.offsets[d] >= 2:
                return d

    def __iter__(self) -> DocumentChunkIterator:
        return self

    def __next__(self) -> DocumentBatch:
        import torch

        if all(s[0] == -2 for s in self.streams):
            raise StopIteration
        B, T = self.batch_size, self.block_size
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        reset = np.zeros(B, dtype=bool)
        for b, stream in enumerate(self.streams):
            if stream[0] == -1:
                d = self._next_doc()
                stream[:] = [-2, 0] if d is None else [d, 0]
                reset[b] = True
            if stream[0] == -2:
                reset[b] = True
                continue
            d, pos = stream
            doc = self.tokens[self.offsets[d]:self.offsets[d + 1]]
            ys = np.asarray(doc[pos + 1:pos + T + 1], dtype=np.int64)
            k = ys.shape[0]
            x[b, :k] = doc[pos:pos + k]
            y[b, :k] = ys
            pos += T
            stream[:] = [-1, 0] if pos >= doc.shape[0] - 1 else [d, pos]
        if all(s[0] == -2 for s in self.streams) and (y == IGNORE_INDEX).all():
            raise StopIteration
        xt, yt, rt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(reset)
        if self.device is not None:
            xt, yt, rt = xt.to(self.device), yt.to(self.device), rt.to(self.device)
        return DocumentBatch(xt, yt, rt)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "streams": [list(s) for s in self.streams],
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != self.batch_size:
            raise DataError(f"Saved document iterator has {len(state['streams'])} streams, "
                            f"this one {self.batch_size}: resume with the same batch size.")
        if state.get("seed") != self.seed:
            raise DataError("Saved document iterator used a different shuffle seed.")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.streams = [[int(d), int(p)] for d, p in state["streams"]]


def document_chunks(
    cache: TokenCache,
    batch_size: int,
    block_size: int,
    *,
    seed: int | None = None,
    loop: bool = False,
    pad_id: int | None = None,
    device: Any = None,
) -> DocumentChunkIterator:
    """Document-ordered batches for the context-aware model; see :class:`DocumentChunkIterator`."""
    return DocumentChunkIterator(cache, batch_size, block_size, seed=seed, loop=loop, pad_id=pad_id,
                                 device=device)


# ------------------------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from model.tokenizer import TokenizerError, load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m model.data",
                                     description="Tokenize a story corpus into the on-disk cache.")
    parser.add_argument("--data", default="tinystories", help="'tinystories', a .txt/.jsonl file or folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder, .model file, or tiktoken:NAME")
    parser.add_argument("--cache-dir", default=None, help=f"default ${CACHE_DIR_ENV} or ~/.cache/storyforge/tokens")
    args = parser.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        source = resolve_data_source(args.data, args.split)
        cache = TokenCache.open(build_token_cache(source, tok, args.cache_dir))
    except (DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = cache.meta
    print(f"{cache.path}\n{m['document_count']} stories, {m['token_count']} tokens ({m['dtype']}), "
          f"{m['text_bytes'] / max(1, m['token_count']):.2f} bytes/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
