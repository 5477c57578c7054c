"""Which LoRA adapter a request names, checked before anything is billed. No torch here.

A request's ``loras[i].path`` is an installed adapter (a ``.safetensors`` file or a folder
under ``ZIMAGE_LORA_DIR``), a Hugging Face repo id already in the local cache, or, where
the operator allows it, an HTTPS URL (``images/lora_download.py``). Each becomes a
``LoraRef``: a local safetensors file whose header was read (no tensors) to refuse
what cannot work: pickles, other files, adapters too large or of too high a rank. Whether
its layers fit the model is only known by loading it; the worker reports that as a 400.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.engine.protocol import LoraRef
from zimage_server.outbound import Destination
from zimage_server.protocol.segmind import LoraEntry

SUFFIX = ".safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"{_PART}(/{_PART})*")
_WEIGHT = re.compile(_PART)
_RANK_KEYS = (".lora_A.", ".lora_down.", "lora_A.weight", "lora_down.weight")


@dataclass(frozen=True, slots=True)
class InstalledLora:
    """One adapter of ``GET /v1/loras``."""

    name: str
    size_bytes: int


def refuse(index: int, name: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid 'loras[{index}]': adapter '{name[:120]}' {reason}.", field="loras"
    )


class LoraCatalog:
    """Installed adapters, and the checks every adapter of a request passes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.loras_dir

    def installed(self) -> list[InstalledLora]:
        """Every ``.safetensors`` under the folder (a folder with one counts once, by name)."""
        if not self.root.is_dir():
            return []
        found: dict[str, InstalledLora] = {}
        for file in sorted(self.root.rglob("*" + SUFFIX)):
            relative = file.relative_to(self.root)
            name = relative.with_suffix("").as_posix()
            if file.name == DIFFUSERS_FILE and len(relative.parts) > 1:
                name = relative.parent.as_posix()
            if _NAME.fullmatch(name):
                found.setdefault(name, InstalledLora(name, file.stat().st_size))
        return list(found.values())

    def check_count(self, entries: Sequence[LoraEntry]) -> None:
        limit = self.settings.max_loras
        if len(entries) > limit:
            allowed = "LoRAs are off on this server" if limit == 0 else f"at most {limit}"
            raise InvalidRequest(
                f"Invalid 'loras': {allowed} (ZIMAGE_MAX_LORAS); got {len(entries)}.",
                field="loras",
            )

    def resolve_local(self, index: int, entry: LoraEntry) -> LoraRef:
        """An installed adapter or a cached repo; URLs are the downloader's."""
        name = entry.path
        if name.lower().startswith(("http://", "https://")):
            raise self.url_refusal(index, name)
        if entry.weight_name is not None and not _WEIGHT.fullmatch(entry.weight_name):
            raise refuse(index, name, "has an invalid weight_name (a plain file name)")
        if not _NAME.fullmatch(name) or ".." in name.split("/"):
            raise refuse(
                index,
                name,
                "is not a valid name: use an installed adapter's name (letters, digits, "
                "'.', '_', '-', folders with '/'; see GET /v1/loras), a Hugging Face repo "
                "id, or an https:// URL",
            )
        file = self._installed_file(index, name, entry.weight_name) or self._cached_repo(
            index, name, entry.weight_name
        )
        if file is None:
            raise refuse(
                index,
                name,
                "is not installed on this server (GET /v1/loras lists those that are) and "
                "is not a Hugging Face repo in its cache",
            )
        return self.checked(index, name, file, entry.scale)

    def url_refusal(self, index: int, url: str) -> InvalidRequest:
        """Why this URL is not fetched: URLs off, not https, or a refused address."""
        if not self.settings.lora_allow_urls:
            return refuse(
                index, url, "is a URL, and URLs are off on this server (ZIMAGE_LORA_ALLOW_URLS)"
            )
        from zimage_server.jobs.webhooks import WebhookPolicy

        destination = Destination.parse(url, f"loras[{index}].path")
        if destination.url.scheme != "https":
            return refuse(index, url, "must be an https:// URL")
        policy = WebhookPolicy.from_settings(self.settings)
        try:
            replace(policy, enabled=True).check(url)
        except InvalidRequest as exc:
            return refuse(index, url, "is refused: " + exc.message.split(": ", 1)[-1])
        return refuse(index, url, "cannot be fetched: downloading adapters is not built yet")

    def _installed_file(self, index: int, name: str, weight_name: str | None) -> Path | None:
        root = self.root
        for candidate in (root / name, root / (name + SUFFIX)):
            if candidate.is_dir():
                return _file_in(index, name, candidate, weight_name)
            if candidate.is_file():
                return candidate
        for pickle in PICKLES:
            if (root / (name + pickle)).is_file():
                return root / (name + pickle)  # refused by ``checked``, with the reason
        return None

    def _cached_repo(self, index: int, name: str, weight_name: str | None) -> Path | None:
        """A repo id found in the local Hugging Face cache: nothing is downloaded."""
        if name.count("/") != 1:
            return None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = snapshot_download(name, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError):
            return None
        return _file_in(index, name, Path(folder), weight_name)

    def checked(self, index: int, name: str, file: Path, scale: float) -> LoraRef:
        """The file as a ``LoraRef``, if it is a safetensors LoRA this server can take."""
        if file.suffix != SUFFIX:
            raise refuse(
                index,
                name,
                f"is a '{file.suffix or 'plain'}' file: only .safetensors adapters are accepted "
                "(pickle formats such as .bin, .pt or .ckpt never are)",
            )
        stat = file.stat()
        limit = self.settings.lora_max_bytes
        if stat.st_size > limit:
            raise refuse(
                index, name, f"is {stat.st_size} bytes; at most {limit} (ZIMAGE_LORA_MAX_BYTES)"
            )
        check_header(index, name, file, self.settings.lora_max_rank)
        identity = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return LoraRef(name=name, path=str(file), identity=identity, scale=float(scale))


def _file_in(index: int, name: str, folder: Path, weight_name: str | None) -> Path:
    """The adapter file of a folder: ``weight_name``, diffusers' name, or its only one."""
    if weight_name is not None:
        if not (folder / weight_name).is_file():
            raise refuse(index, name, f"has no file '{weight_name}'")
        return folder / weight_name
    if (folder / DIFFUSERS_FILE).is_file():
        return folder / DIFFUSERS_FILE
    files = sorted(folder.glob("*" + SUFFIX))
    if len(files) != 1:
        some = "several .safetensors files" if files else "no .safetensors file"
        raise refuse(index, name, f"is a folder with {some}: name one with 'weight_name'")
    return files[0]


def check_header(index: int, name: str, file: Path, max_rank: int) -> None:
    """Read the safetensors header only: a LoRA's keys, and ranks within the slots'."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as reader:
            keys = list(reader.keys())
            ranks = [
                reader.get_slice(key).get_shape()[0]
                for key in keys
                if any(mark in key for mark in _RANK_KEYS)
            ]
    except (SafetensorError, OSError, ValueError) as exc:
        raise refuse(index, name, f"is not a valid safetensors file ({exc})") from None
    if not ranks:
        raise refuse(index, name, "has no LoRA weights (lora_A/lora_B or lora_down/lora_up)")
    if max(ranks) > max_rank:
        raise refuse(
            index,
            name,
            f"has rank {max(ranks)}; this server takes at most {max_rank} (ZIMAGE_LORA_MAX_RANK)",
        )
