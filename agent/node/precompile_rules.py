"""Node side of the `precompile` format: may this node install the precompiled entries?

A precompiled Dynamo entry skips the checks a fresh trace would make, and torch keys it
only by the forward's qualified name and first line. So a node installs the entries of a
manifest only if all of these hold, and otherwise installs the capture without them (the
FX-graph cache still makes it warm) and says why in one line:
  - the manifest is a `precompile` capture of the scheme this torchwarm knows (2: the
    seed's canary loaded the entries in a fresh process, seed/canary.py);
  - the seed kept its entries (`entries: kept`; dropped ones say why);
  - the workload here is configured as on the seed (model, model_kwargs, mode, device,
    compile options): torch drops the identity guards that would notice another one;
  - for a model, its package, hashed from this node's files (never imported), has the
    seed's code identity; for a command, its `code` files, its arguments and every
    installed distribution it imported on the seed (name, version, RECORD digest) are
    the same here (codeid.py);
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
# The meaning of the manifest's warmup.precompile fields; bump on change. 2: the canary
# (entries: kept / dropped) and command workloads; 1 published entries nobody had loaded.
SCHEME = 2
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
    scheme = meta.get("scheme")
    if isinstance(scheme, int) and scheme < SCHEME:
        return Decision(
            False,
            f"precompile scheme {scheme} comes from an older torchwarm seed, which did not "
            "check that its entries load; warm the workload up again with this torchwarm",
        )
    if scheme != SCHEME:
        return Decision(
            False,
            f"precompile scheme {scheme!r} is not the one this torchwarm knows "
            f"({SCHEME}); upgrade torchwarm on this node",
        )
    if meta.get("entries") != "kept":
        return Decision(False, f"the seed published no entries: {meta.get('entries_reason')}")
    if w.mode == "train":
        return Decision(False, f"workload {w.name!r} is a training workload")
    if meta.get("workload_sha256") != codeid.workload_identity(w):
        return Decision(
            False,
            f"workload {w.name!r} is configured here otherwise than on the seed (model, "
            "model_kwargs, mode, device or compile options)",
        )
    seed_id = meta.get("code_identity") or {}
    differs = (
        _model_differs(w, seed_id, search_path)
        if w.command is None
        else _command_differs(w, seed_id, search_path)
    )
    if differs:
        return Decision(False, differs)
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


def _model_differs(
    w: Workload, seed_id: Mapping[str, Any], search_path: Sequence[str] | None
) -> str:
    """Why the model's code here is not the seed's; "" when it is."""
    assert w.model is not None, "a model workload names its model"
    try:
        here = codeid.code_identity(w.model, search_path)
    except ConfigError as e:
        return f"cannot hash the model code on this node: {e}"
    if here.package != seed_id.get("package") or here.sha256 != seed_id.get("sha256"):
        return (
            f"the model code differs from the seed's: package {here.package!r} hashes to "
            f"{here.sha256[:12]} here ({here.files} files), "
            f"{str(seed_id.get('sha256'))[:12]} on the seed ({seed_id.get('files')} files)"
        )
    return ""


def _command_differs(
    w: Workload, seed_id: Mapping[str, Any], search_path: Sequence[str] | None
) -> str:
    """Why the command's code, arguments or imported distributions here are not the
    seed's; "" when they are the same."""
    assert w.command is not None, "a command workload has its command"
    if seed_id.get("kind") != "command":
        return "the manifest's code identity is not a command's (a model workload's capture?)"
    seen = seed_id["distributions"]  # checked by the manifest's parser (spec/manifest.py)
    try:
        dists = [codeid.distribution_identity(d["name"], d["modules"], search_path) for d in seen]
        here = codeid.command_identity(w.command.code, w.command.argv, dists)
    except ConfigError as e:
        return f"cannot identify the command's code on this node: {e}"
    if here["code_sha256"] != seed_id.get("code_sha256"):
        return (
            f"the command's code files differ from the seed's: they hash to "
            f"{here['code_sha256'][:12]} here, {str(seed_id.get('code_sha256'))[:12]} on the seed"
        )
    if here["args"] != seed_id.get("args"):
        return "the command's arguments differ from the seed's"
    for mine, theirs in zip(dists, seen, strict=True):
        if mine.version != theirs["version"]:
            return (
                f"distribution {mine.name!r} is {mine.version} here, {theirs['version']} "
                "on the seed"
            )
        if mine.digest != theirs["digest"]:
            return (
                f"distribution {mine.name!r} {mine.version} is another install here than on "
                f"the seed ({mine.digest[:19]} here, {str(theirs['digest'])[:19]} there)"
            )
    return ""


def app_env(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """What `torchwarm run` adds to the app's environment, from the marker's workloads.

    TORCH_CACHING_PRECOMPILE=1 when at least one workload had its precompiled entries
    installed (`"precompiled": true`); nothing otherwise, so that an app whose entries
    were left out compiles with torch's full guards.
    """
    if any(o.get("precompiled") is True for o in outcomes):
        return {ENV_VAR: "1"}
    return {}
