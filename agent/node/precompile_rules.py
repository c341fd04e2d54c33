"""Node side of the `precompile` format: may this node install the precompiled entries?

A precompiled Dynamo entry skips the checks a fresh trace would make, and torch keys it
only by the forward's qualified name and first line. So a node installs the entries of a
manifest only if all of these hold, and otherwise installs the capture without them (the
FX-graph cache still makes it warm) and says why in one line:
  - the manifest is a `precompile` capture of a scheme this torchwarm knows;
  - the workload here is configured as on the seed (model, model_kwargs, mode, device,
    compile options): torch drops the identity guards that would notice another one;
  - the model's package, hashed from this node's files (never imported), has the seed's
    code identity (codeid.py);
  - no other workload of the same pull has an entry under the same key.
The app must then run with TORCH_CACHING_PRECOMPILE=1 (app_env) to load them.
docs/precompile.md explains each rule with what was measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchwarm.env import codeid
from torchwarm.errors import ConfigError

if TYPE_CHECKING:
    from torchwarm.config import Workload
    from torchwarm.spec.manifest import Manifest

FORMAT = "precompile"
SCHEME = 1  # the meaning of the manifest's warmup.precompile fields; bump on change
ENV_VAR = "TORCH_CACHING_PRECOMPILE"  # read by torch._dynamo.config when torch is imported


@dataclass(frozen=True)
class Decision:
    install: bool  # install the precompiled entries (the rest of the capture either way)
    reason: str = ""  # one line, when not


def decide(
    m: Manifest,
    w: Workload,
    others: Iterable[Manifest] = (),
    search_path: Sequence[str] | None = None,
) -> Decision:
    """Whether the precompiled entries of `m` may be installed for the node's workload `w`.

    `others`: the other manifests this pull installs into the same cache dir.
    `search_path`: where the app imports the model from (default: this sys.path; the
    pull must run with the app's PYTHONPATH and working directory).
    """
    if m.format != FORMAT:
        return Decision(False, f"format {m.format!r} carries no precompiled entries")
    meta = m.warmup.get("precompile")
    if not isinstance(meta, dict):
        return Decision(False, "the manifest has no precompile fields")
    if meta.get("scheme") != SCHEME:
        return Decision(
            False,
            f"precompile scheme {meta.get('scheme')!r} is not the one this torchwarm "
            f"knows ({SCHEME}); upgrade torchwarm on this node",
        )
    if w.mode == "train":
        return Decision(False, f"workload {w.name!r} is a training workload")
    if meta.get("workload_sha256") != codeid.workload_identity(w):
        return Decision(
            False,
            f"workload {w.name!r} is configured here otherwise than on the seed (model, "
            "model_kwargs, mode, device or compile options)",
        )
    seed_id = meta.get("code_identity") or {}
    try:
        here = codeid.code_identity(w.model, search_path)
    except ConfigError as e:
        return Decision(False, f"cannot hash the model code on this node: {e}")
    if here.package != seed_id.get("package") or here.sha256 != seed_id.get("sha256"):
        return Decision(
            False,
            f"the model code differs from the seed's: package {here.package!r} hashes to "
            f"{here.sha256[:12]} here ({here.files} files), "
            f"{str(seed_id.get('sha256'))[:12]} on the seed ({seed_id.get('files')} files)",
        )
    ours = set(meta.get("dynamo_keys") or ())
    for o in others:
        if o.workload == m.workload or o.format != FORMAT:
            continue
        shared = ours & set((o.warmup.get("precompile") or {}).get("dynamo_keys") or ())
        if shared:
            return Decision(
                False,
                f"its Dynamo entry {min(shared)[:12]} has the same key as one of workload "
                f"{o.workload!r} (torch keys entries by the forward's name and first line)",
            )
    return Decision(True)


def app_env(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """What `torchwarm run` adds to the app's environment, from the marker's workloads.

    TORCH_CACHING_PRECOMPILE=1 when at least one workload had its precompiled entries
    installed (`"precompiled": true`); nothing otherwise, so that an app whose entries
    were left out compiles with torch's full guards.
    """
    if any(o.get("precompiled") is True for o in outcomes):
        return {ENV_VAR: "1"}
    return {}
