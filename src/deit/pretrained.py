"""The official DeiT weights by name: where they come from, the cache, and the converted folders.

Eight checkpoints under timm's names, from three places: the official download URLs (`official`,
facebookresearch/deit; the file name's hash prefix is checked against the file's SHA-256, as
`torch.hub` does), or the Hugging Face Hub in its two layouts (`hf`: `facebook/deit-*`, the
transformers layout; `timm`: `timm/deit_*.fb_in1k`). The sixteen DeiT III checkpoints (`deit3_*`
for ImageNet-1k, `deit3_*.fb_in22k_ft_in1k` for 21k -> 1k) come from the Hub's timm layout only:
their official file names carry no hash, so nothing could check a download of them. The Hub is
reached through `huggingface_hub`, so `HF_HOME`, `HF_HUB_OFFLINE` and `HF_ENDPOINT` apply and
its files stay in its own cache.

Everything else lives in one folder, `$DEIT_HOME` (else `~/.cache/deit`):

    downloads/<file>             official checkpoints, written as `.part` and renamed once checked
    pretrained/<name>/<source>/  the converted exported folder (config.json + params.safetensors,
                                 with the registry's preprocessing): a second load reads only this

The registry itself, the names and what each holds, is `deit.weights` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deit import export
from deit.convert import convert_checkpoint
from deit.data.config import cache_home
from deit.errors import InputError
from deit.model import DeiT, adapt_params
from deit.model import create_model as _create_model
from deit.teacher import Teacher
from deit.variants import Preprocessing, resolve_name
from deit.weights import (  # noqa: F401 -- the registry, importable from here as before
    DEIT3_PRETRAINED,
    OFFICIAL_URL,
    PRETRAINED,
    SOURCES,
    TEACHER_WEIGHTS,
    TORCHVISION_URL,
    Source,
    Weights,
    weights,
)

log = logging.getLogger("deit")

CHUNK = 1 << 20
TIMEOUT_S = 30.0


def downloads_dir() -> Path:
    return cache_home() / "downloads"


def pretrained_dir() -> Path:
    return cache_home() / "pretrained"


def _progress(total: int | None, label: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        label,
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
    )
    return bar, bar.add_task(label, total=total)


def download(url: str, target: Path, sha256_prefix: str | None = None) -> Path:
    """`url` into `target`, through `target.part`: renamed only once complete and, with
    `sha256_prefix`, once its SHA-256 starts with it. Any failure leaves no file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as err:
            raise InputError(f"HTTP {err.code} {err.reason} for {url}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise InputError(
                f"cannot download {url} ({reason}); with no network, put the file at {target} "
                "or pass a local checkpoint file instead of the name"
            ) from None
        with response:
            size = response.headers.get("Content-Length")
            total = int(size) if size is not None else None
            log.info(f"downloading {url} ({_mib(total)}) to {target}")
            bar, task = _progress(total, target.name)
            received = 0
            with bar, open(part, "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, ValueError) as err:  # a reset or a short chunked read
                        raise InputError(
                            f"the download of {url} broke off after {_mib(received)} ({err}); "
                            "nothing was cached, run the command again"
                        ) from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(task, advance=len(chunk))
        if total is not None and received != total:
            raise InputError(
                f"the download of {url} broke off after {received} of {total} bytes; nothing "
                "was cached, run the command again"
            )
        found = digest.hexdigest()
        if sha256_prefix and not found.startswith(sha256_prefix):
            raise InputError(
                f"{url} has SHA-256 {found[:12]}..., not the {sha256_prefix} its name promises; "
                "refused and not cached"
            )
        os.replace(part, target)
        return target
    finally:
        part.unlink(missing_ok=True)


def _mib(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 2**20:.1f} MiB"


def _hub_file(repo: str, names: tuple[str, ...]) -> Path:
    """The first of `names` in Hub repo `repo`, through the Hub's own cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    for i, name in enumerate(names):
        try:
            return Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError:  # before its base class EntryNotFoundError
            raise InputError(
                f"cannot download {name} of {repo} from {endpoint} (offline, or no network); "
                "run once with network access (the Hub caches it under HF_HOME) or pass a "
                "local checkpoint file instead of the name"
            ) from None
        except EntryNotFoundError:
            if i == len(names) - 1:
                raise InputError(f"{endpoint}/{repo} has none of {', '.join(names)}") from None
        except Exception as err:  # the Hub client's HTTP errors: status and URL in one line
            raise InputError(f"{endpoint}/{repo}: {str(err).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def checkpoint_file(name: str, source: Source | None = None) -> Path:
    """The checkpoint file of `name` from `source` (None: `Weights.default_source`), downloaded
    once into the cache."""
    w = weights(name)
    source = source or w.default_source
    if source == "official" and not w.pinned:
        raise InputError(
            f"{name}: the official {w.file} carries no hash, so its download cannot be checked; "
            f"expected {name} or {name}@timm (the Hub's {w.timm_repo}, checked by the Hub)"
        )
    if source == "official":
        target = downloads_dir() / w.file
        if target.is_file():
            return target
        return download(w.url, target, w.sha256_prefix)
    if source == "hf" and (name in TEACHER_WEIGHTS or not w.pinned):
        raise InputError(
            f"{name} has no Hugging Face transformers layout; expected {name} (the official "
            f"file) or {name}@timm ({w.timm_repo})"
        )
    if source == "hf":
        return _hub_file(w.hf_repo, ("model.safetensors", "pytorch_model.bin"))
    if source == "timm":
        return _hub_file(w.timm_repo, ("model.safetensors", "pytorch_model.bin"))
    raise InputError(f"source {source!r}; expected one of {', '.join(SOURCES)}")


def pretrained_folder(name: str, source: Source | None = None) -> Path:
    """The exported model folder of the official weights `name` (from `source`, None: the
    weights' default): converted once (the registry's preprocessing written into its
    config.json) and read from the cache after."""
    w = weights(name)
    source = source or w.default_source
    folder = pretrained_dir() / name / source
    if (folder / export.CONFIG).is_file() and (folder / export.WEIGHTS).is_file():
        return folder
    ckpt = checkpoint_file(name, source)
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        # A RegNet or ResNet name goes to deit.regnet_convert / deit.resnet_convert.
        convert_checkpoint(
            ckpt, w.variant, part, crop_pct=w.crop_pct, preprocessing=w.preprocessing
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(part, folder)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    log.info(f"converted {name} ({source}) into {folder}")
    return folder


def load_pretrained(name: str, source: Source | None = None) -> tuple[Any, dict]:
    """`(model, variables)` of the official weights `name` (`deit.export.load_exported` of
    `pretrained_folder`); the folder's config.json also holds its preprocessing."""
    model, variables, _ = export.load_exported(pretrained_folder(name, source))
    return model, variables


def resolve(path_or_name: str | os.PathLike) -> Path:
    """An existing path as it is; else a pretrained name's exported folder (`pretrained_folder`).
    `NAME@hf` / `NAME@timm` pick the Hub layouts."""
    path = Path(path_or_name)
    if path.exists():
        return path
    name, _, source = str(path_or_name).partition("@")
    if name in PRETRAINED or name in TEACHER_WEIGHTS:
        return pretrained_folder(name, source or None)  # type: ignore[arg-type]
    if str(path_or_name).startswith(("https://", "http://")):
        return url_folder(str(path_or_name))
    return path


def exported_folder(path_or_name: str | os.PathLike) -> Path:
    """The exported model folder of a folder, a run folder (its `final/`, else `best/`) or a
    name of the official weights (`resolve`: downloaded and converted once)."""
    return export.find_exported(resolve(path_or_name))


@dataclass(frozen=True)
class ExportedModel:
    """An exported model, opened: everything `deit eval` / `predict` / `visualize` / a teacher
    folder / `--finetune` need from it."""

    model: Any
    """The Flax module (`DeiT` or `teacher.ResNet`), as its `config.json` describes it."""
    variables: dict
    """`{"params": ..., "batch_stats": ...}` (batch_stats only for BatchNorm models)."""
    preprocessing: Preprocessing
    """How images become its input (the crop on the host, normalisation on the device)."""
    classes: list[str] | None
    """The class folders it was trained on, when its `config.json` records them."""
    config: dict[str, Any]
    """Its `config.json`, as read."""
    folder: Path
    """The exported folder it came from (a run's `final/`, a converted cache folder, ...)."""

    def as_teacher(self) -> Teacher:
        """A frozen teacher (a trained ResNet or any DeiT), normalising with `preprocessing`."""
        prep = self.preprocessing
        if isinstance(self.model, DeiT):
            return Teacher.from_deit(self.model, self.variables, prep.mean, prep.std)
        # A ResNet resizes the student's images to the size it was trained at, when that is known.
        size = prep.img_size if self.config.get("img_size") else None
        return Teacher.from_resnet(self.model, self.variables, prep.mean, prep.std, size)


def open_model(name_or_path: str | os.PathLike) -> ExportedModel:
    """Any exported model, by folder, run folder or official name (`exported_folder`), loaded
    with the layout check of `export.load_exported`."""
    folder = exported_folder(name_or_path)
    model, variables, config = export.load_exported(folder)
    return ExportedModel(
        model=model,
        variables=variables,
        preprocessing=Preprocessing.from_config(config, model),
        classes=config.get("classes"),
        config=config,
        folder=folder,
    )


def create_model(name: str, *, pretrained: bool = False, **overrides: Any) -> Any:
    """`deit.create_model`: a registered variant as a `DeiT` (`model.create_model`), or with
    `pretrained=True` (the eight official checkpoints, `PRETRAINED`) the pair
    `(model, variables)`, as timm's `create_model(name, pretrained=True)`: the weights are
    downloaded and converted once, the position embedding is resampled to another `img_size`
    and the heads start fresh for another `num_classes` (`model.adapt_params`)."""
    if not pretrained:
        return _create_model(name, **overrides)
    model, variables = load_pretrained(name if name in PRETRAINED else resolve_name(name))
    fields = {f.name for f in dataclasses.fields(DeiT)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown override(s) {unknown} for {name}; expected {sorted(fields)}")
    if not overrides:
        return model, variables
    target = model.clone(**overrides)
    return target, {"params": adapt_params(variables["params"], model, target)}


def _converted(ckpt: Path, folder: Path, model_name: str | None) -> Path:
    """`ckpt` converted into `folder` once (through `folder.part`): the cached folder after."""
    from deit import export
    from deit.convert import convert_checkpoint

    if (folder / export.CONFIG).is_file() and (folder / export.WEIGHTS).is_file():
        return folder
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        convert_checkpoint(ckpt, model_name, part)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(part, folder)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    log.info(f"converted {ckpt} into {folder}")
    return folder


def url_folder(url: str, model_name: str | None = None) -> Path:
    """The exported folder of the checkpoint at `url` (official `--teacher-path URL`): downloaded
    once into `downloads/` (its SHA-256 checked against the hash prefix its file name carries,
    `NAME-<hex>.pth`, when it carries one) and converted once into `pretrained/<file>/url`.
    `model_name` (a registered name) must then match the file's network."""
    file = url.rstrip("/").rpartition("/")[2].partition("?")[0]
    if not file:
        raise InputError(f"{url} names no file; expected a URL ending in NAME-<hash>.pth")
    known = [w for w in (*PRETRAINED.values(), *TEACHER_WEIGHTS.values()) if w.file == file]
    found = re.search(r"-([0-9a-f]{6,})\.", file)
    if known and known[0].pinned and known[0].url == url and model_name in (None, known[0].name):
        return pretrained_folder(known[0].name)  # an official URL: the name's own cache entry
    target = downloads_dir() / file
    if not target.is_file():
        download(url, target, found[1] if found else None)
    name = model_name or (known[0].name if known else None)
    return _converted(target, pretrained_dir() / file.partition(".")[0] / "url", name)


def file_folder(path: str | os.PathLike, model_name: str | None = None) -> Path:
    """The exported folder of a local checkpoint file (`.pth`, `.safetensors`, read by the
    restricted unpickler), converted once into `pretrained/<stem>/file-<key>`; the key follows
    the file's absolute path, size and modification time, so an edited file converts again."""
    path = Path(path).absolute()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = path.name.partition(".")[0]
    return _converted(path, pretrained_dir() / stem / f"file-{key}", model_name)


def cache_entries() -> list[tuple[Path, int]]:
    """`(path, bytes)` of every download and converted folder in the cache."""
    out = []
    if downloads_dir().is_dir():
        out += [(p, p.stat().st_size) for p in sorted(downloads_dir().iterdir()) if p.is_file()]
    if pretrained_dir().is_dir():
        for folder in sorted(pretrained_dir().glob("*/*")):
            if folder.is_dir():
                out.append(
                    (folder, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
                )
    return out


def clear_cache(name: str | None = None) -> list[Path]:
    """Delete the downloads and converted folders (of `name` only, when given); returns them."""
    if name is not None:
        weights(name)
    removed = []
    for path, _ in cache_entries():
        # Downloads are `NAME-<hash>.pth`; converted folders `NAME/<source>`, and a URL's or a
        # file's copy `NAME-<hash>/url` or `NAME/file-<key>`.
        parts = path.relative_to(cache_home()).parts[1:2]
        if name is None or any(p == name or p.startswith(name + "-") for p in parts):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if pretrained_dir().is_dir():
        for folder in pretrained_dir().iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return removed
