"""The grouping sweeper's logic (docs/architecture.md, "Train"; the syntax: docs/sweeps.md).

`python train.py -m ...` expands the multirun grid (command-line overrides, `hydra.sweeper.params`
and the union of `hydra.sweeper.grids`), then `plan` packs every combination that differs from
others only in per-SAE settings (`PER_SAE_KEYS`: sae.*, lr, warmup, grad_clip, seed, name) into one
job, so that those SAEs share one read of the data. Combinations whose job settings differ
(what is read and how the job runs: data.*, n_train, precision, trainer.*, ...) are separate jobs;
`max_saes_per_job` splits large groups evenly. Grouping compares the composed configs' job
settings, so `n_train=1000` and a default of 1000 share a job.

The Hydra plugin (`hydra_plugins/saev_sweeper`) validates and writes the plan to
`<sweep dir>/sweep.json`, and hands the launcher one job per group, its SAEs as the `members`
override; `saev.train.sweep_job` runs one job. `finish` fills the summary rows of jobs that died.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
from collections.abc import Callable

from saev import shards
from saev.cli import one_line
from saev.train import summary
from saev.train.config import PER_SAE_KEYS, TrainConfig, override_value

PLAN_NAME = "sweep.json"
GRIDS_DOC = "docs/sweeps.md"


class SweepError(ValueError):
    """A sweep that cannot run as given; the message names the key."""


@dataclasses.dataclass
class SAEPlan:
    """One SAE of a sweep."""

    name: str
    """Its directory in the job's run directory; unique within the job."""
    overrides: list[str]
    """Its own overrides: per-SAE settings, and job settings the job's other SAEs spell
    differently (with the same composed value)."""
    settings: dict[str, str]
    """Its value of every swept key (`Plan.swept`); "" where it leaves the key unset."""


@dataclasses.dataclass
class JobPlan:
    """One job: SAEs trained side by side on one data stream."""

    num: int
    """Job number; the job's run directory is `<sweep dir>/job-<num>`."""
    overrides: list[str]
    """Overrides that every SAE of the job shares (job settings)."""
    saes: list[SAEPlan]
    """The job's SAEs, in grid order."""

    @property
    def run_id(self) -> str:
        return f"job-{self.num}"

    def launch_overrides(self) -> list[str]:
        """What the launcher runs: the shared overrides plus the SAEs as `members`."""
        members = ",".join("[" + ",".join(quote(o) for o in s.overrides) + "]" for s in self.saes)
        return [*self.overrides, f"members=[{members}]"]


@dataclasses.dataclass
class Plan:
    """A whole sweep, as written to `<sweep dir>/sweep.json`."""

    jobs: list[JobPlan]
    swept: list[str]
    """Keys whose value differs between the sweep's SAEs, in grid order (summary.csv columns)."""

    @property
    def n_saes(self) -> int:
        return sum(len(j.saes) for j in self.jobs)


# ----------------------------------------------------------------------------- the grid


def quote(text: str) -> str:
    """`text` as a quoted Hydra override string (backslashes matter only before quotes);
    `${` is escaped so an interpolation reaches the member's composition unresolved."""
    text = text.replace("${", "\\${")
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m[1] * 2, text)
    return f"'{text}'"


def bare(key: str) -> str:
    """An override's config key without `+`, `++`, `~` and `@package`."""
    return key.lstrip("+~").split("@")[0]


def is_per_sae(key: str) -> bool:
    return bare(key).split(".")[0] in PER_SAE_KEYS


def axes(overrides: list, where: str = "") -> dict[str, list[str]]:
    """Parsed overrides as {key: one override string per value}; a later key replaces an earlier
    one (as in Hydra's basic sweeper). `sweep={k: [values]}` (the in-job product) becomes axes."""
    out: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if bare(key) == "members":
            raise SweepError("members is set by the sweeper for each job; sweep settings instead.")
        if bare(key) == "sweep" and not o.is_sweep_override():
            value = o.value() or {}
            if not isinstance(value, dict):
                raise SweepError(f"sweep must be a dict such as {{sae: [relu, topk]}}{where}.")
            for k, values in value.items():
                values = values if isinstance(values, list) else [values]
                if not values:
                    raise SweepError(f"sweep.{k} is an empty list (an empty grid){where}.")
                out[k] = [f"{k}={override_value(v)}" for v in values]
        elif o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise SweepError(
                    f"{o.input_line}: only lists, choice() and range() can be swept{where}."
                )
            values = list(o.sweep_string_iterator())
            if not values:
                raise SweepError(f"{o.input_line} sweeps no values (an empty grid){where}.")
            out[key] = [f"{key}={v}" for v in values]
        else:
            out[key] = [o.input_line]
    return out


def grid_overrides(grid) -> list[str]:
    """One grid of `hydra.sweeper.grids` ({key: value}) as override strings: a string value is
    override syntax (so "32,64" sweeps two values), anything else one value."""
    if not isinstance(grid, dict):
        raise SweepError(f"each of hydra.sweeper.grids must be a {{key: values}} map: {grid!r}.")
    return [f"{k}={v if isinstance(v, str) else override_value(v)}" for k, v in grid.items()]


def combinations(
    base: dict[str, list[str]], grids: list[dict[str, list[str]]] | None
) -> list[dict[str, str]]:
    """The product of `base`, or the union over grids of base x grid; repeats are dropped. A
    grid's value replaces a single value set outside the grids (a default for all grids)."""
    products = [base] if grids is None else []
    for i, grid in enumerate(grids or []):
        clash = sorted(bare(k) for k in grid if len(base.get(k, ())) > 1)
        if clash:
            raise SweepError(
                f"{clash[0]} is swept outside the grids and set in hydra.sweeper.grids[{i}]; "
                "sweep it in one place."
            )
        products.append({**base, **grid})
    seen, out = set(), []
    for product in products:
        for values in itertools.product(*product.values()):
            combo = dict(zip(product, values))
            signature = tuple(sorted(combo.values()))
            if signature not in seen:
                seen.add(signature)
                out.append(combo)
    return out


def value_of(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


# ----------------------------------------------------------------------------- the plan


def plan(
    arguments: list[str],
    compose: Callable[[list[str]], TrainConfig],
    *,
    params: dict | None = None,
    grids: list | None = None,
    max_saes_per_job: int | None = None,
    parser=None,
) -> Plan:
    """Expand and group a multirun. `arguments`: the command line's task overrides; `params`:
    `hydra.sweeper.params` ({key: override value}, before the command line); `grids`: a list of
    {key: value} maps whose union is crossed with the rest; `compose(overrides)`: the full
    `TrainConfig` of one combination (which validates it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = parser or OverridesParser.create()
    if max_saes_per_job is not None and (
        isinstance(max_saes_per_job, bool) or not isinstance(max_saes_per_job, int)
        or max_saes_per_job < 1
    ):  # fmt: skip
        raise SweepError(
            f"hydra.sweeper.max_saes_per_job must be a positive integer or null, "
            f"got {max_saes_per_job!r}."
        )
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    base = axes(parser.parse_overrides(lines))
    parsed_grids = None
    if grids is not None:
        if not grids:
            raise SweepError("hydra.sweeper.grids is an empty list (an empty grid); use null.")
        parsed_grids = [
            axes(parser.parse_overrides(grid_overrides(g)), f" in hydra.sweeper.grids[{i}]")
            for i, g in enumerate(grids)
        ]
    combos = combinations(base, parsed_grids)
    configs = [checked(compose, combo, base) for combo in combos]
    swept = swept_keys(combos)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(json.dumps(c.job_fields(), sort_keys=True, default=str), []).append(i)
    jobs = []
    for members in groups.values():
        for chunk in split(members, max_saes_per_job):
            jobs.append(job_plan(len(jobs), [combos[i] for i in chunk], [configs[i] for i in chunk],
                                 swept))  # fmt: skip
    return Plan(jobs=jobs, swept=[bare(k) for k in swept])


def split(members: list[int], cap: int | None) -> list[list[int]]:
    """`members` in contiguous chunks of at most `cap`, as even as possible (10, cap 4: 4, 3, 3)."""
    n = len(members)
    k = 1 if cap is None else -(-n // cap)
    bounds = [-(-j * n // k) for j in range(k + 1)]  # ceil: the larger chunks come first
    return [members[a:b] for a, b in zip(bounds, bounds[1:])]


def swept_keys(combos: list[dict[str, str]]) -> list[str]:
    keys = list(dict.fromkeys(k for c in combos for k in c))
    return [k for k in keys if len({c.get(k) for c in combos}) > 1]


def job_plan(num: int, combos: list[dict], configs: list[TrainConfig], swept: list[str]) -> JobPlan:
    """A job's shared overrides (job settings spelled the same by all its SAEs) and its SAEs."""
    first = combos[0]
    shared = [
        k for k in first if not is_per_sae(k) and all(c.get(k) == first[k] for c in combos[1:])
    ]
    saes = []
    for i, (combo, cfg) in enumerate(zip(combos, configs)):
        own = [v for k, v in combo.items() if k not in shared]
        if cfg.name is None:
            name = sae_name(i, cfg.sae.kind, combo, swept)
            own.append(f"name={quote(name)}")
        else:
            name = cfg.name
        settings = {bare(k): value_of(combo[k]) if k in combo else "" for k in swept}
        saes.append(SAEPlan(name=name, overrides=own, settings=settings))
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise SweepError(f"SAE names must be unique in a job; job {num} would hold {names}.")
    return JobPlan(num=num, overrides=[first[k] for k in shared], saes=saes)


def sae_name(index: int, kind: str, combo: dict[str, str], swept: list[str]) -> str:
    """'<index>-<kind>-<key>=<value>...' over the per-SAE keys that vary in the sweep."""
    parts = [f"{index:02d}-{kind}"]
    for k in swept:
        if k in combo and is_per_sae(k) and bare(k) not in ("sae", "name"):
            parts.append(f"{bare(k).split('.')[-1]}={value_of(combo[k])}")
    return re.sub(r"[^\w.,=+\-\[\]]", "_", "-".join(parts))


def checked(compose, combo: dict[str, str], base: dict[str, list[str]]) -> TrainConfig:
    """The combination's composed config, or a `SweepError` that names the key at fault."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(list(combo.values()))
    except (ValueError, HydraException, OmegaConfBaseException) as err:
        raise SweepError(explain(err, base, compose)) from None
    if cfg.sweep or cfg.members:
        raise SweepError(
            "sweep/members set in a config file cannot be combined with -m; put the values in "
            "hydra.sweeper.params or hydra.sweeper.grids."
        )
    return cfg


def explain(err: BaseException, base: dict[str, list[str]], compose) -> str:
    """One line for a combination that does not compose; a per-kind key swept beside kinds
    that lack it gets the union-of-grids syntax that expresses it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    msg = one_line(err)
    m = re.search(r"sae\.(\w+) applies only to \[([^\]]*)\], not '(\w+)'", msg)
    key = f"sae.{m[1]}" if m else None
    kinds = [value_of(v) for v in base.get("sae", [])]
    if key is None or len(kinds) < 2 or key not in base:
        return msg
    have = re.findall(r"'(\w+)'", m[2])
    values = ",".join(value_of(v) for v in base[key])
    others = [v[0] for k, v in base.items() if k not in ("sae", key)]
    grids = []
    for kind in kinds:
        try:
            uses = compose([*others, f"sae={kind}"]).sae.activation in have
        except (ValueError, HydraException, OmegaConfBaseException):
            uses = False
        grids.append(f'{{sae: {kind}, {key}: "{values}"}}' if uses else f"{{sae: {kind}}}")
    return (
        f"{key} is swept with sae={','.join(kinds)}, but sae={m[3]} has no {m[1]} (only "
        f"{have} do) and a plain product crosses every kind with every value; sweep a union "
        f"of grids instead: 'hydra.sweeper.grids=[{', '.join(grids)}]' (see {GRIDS_DOC})."
    )


def save_plan(p: Plan, sweep_dir: pathlib.Path) -> None:
    shards.write_json_atomic(sweep_dir / PLAN_NAME, dataclasses.asdict(p))


def load_plan(sweep_dir: pathlib.Path) -> Plan:
    d = json.loads((sweep_dir / PLAN_NAME).read_text())
    jobs = [
        JobPlan(num=j["num"], overrides=j["overrides"], saes=[SAEPlan(**s) for s in j["saes"]])
        for j in d["jobs"]
    ]
    return Plan(jobs=jobs, swept=d["swept"])


def finish(plan: Plan, sweep_dir: pathlib.Path, reasons: list[str | None]) -> list[dict]:
    """Fill `failed` rows for the SAEs of jobs that ended without writing theirs (killed, out of
    memory; `reasons[j]` is what the launcher said about job j, None if it completed), sort the
    summary in plan order and return its rows that are not `done`."""
    written = {(r["job"], r["name"]) for r in summary.read(sweep_dir)}
    missing = []
    for job, reason in zip(plan.jobs, reasons):
        for row in summary.rows(job, sweep_dir / job.run_id, ""):
            if (job.run_id, row["name"]) not in written:
                row["status"] = f"failed: {reason or 'the job wrote no results'}"
                missing.append(row)
    order = [(j.run_id, s.name) for j in plan.jobs for s in j.saes]
    summary.update(sweep_dir, summary.columns(plan.swept), missing, order)
    return [r for r in summary.read(sweep_dir) if r["status"] != "done"]
