"""What the three entry points share about the command line and the terminal: output a user can
act on, nothing else. Imports nothing heavy (each function imports what it needs when called),
so that a mistake on the command line is reported before torch or Lightning load.

- Errors: `fail` prints one line `error: ...` and exits `USER_ERROR`; `one_line` makes that line
  from an exception chain; `run_or_exit` runs a job, prints its output directory last, and turns
  the user's mistakes into such a line.
- Checks before Hydra composes: `check_command_line` (unknown keys and choices, bad types) and
  `check_sae_choices`; `--help` from the schemas (`options`, `print_help`).
- The terminal: `quiet()` silences third-party chatter that no setting of ours changes
  (Lightning's hardware lines and product tips, a deprecation inside Lightning, the `srun` hint
  on SLURM login nodes, W&B's offline banners); `progress(...)` is a tqdm bar that draws only on
  a terminal, so logs and CI output hold no carriage-return spam.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning, with torch 2.14
    r"The `srun` command is available on your system but is not used.*",  # SLURM login nodes
    r".*your dataloader is not resumable.*",  # SeekableLoader repositions the data itself
    r".*ModelCheckpoint with manual optimization.*",  # checkpoints hold the state after the step
    r"Tight layout not applied.*",  # matplotlib, long Pareto labels: the plot is still complete
    r"You defined a `validation_step` but have no `val_dataloader`.*",  # data.val_fraction=0
)


def quiet() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # "GPU available: ...", "TPU available: ...", "💡 Tip: ..." and "`Trainer.fit` stopped" are
    # INFO records of these loggers; warnings and errors still show.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Offline W&B prints a run summary and sync hint per SAE; the run directory says where it is.
    if os.environ.get("WANDB_MODE", "offline") == "offline":
        os.environ.setdefault("WANDB_SILENT", "true")


def progress(**kw):
    """A tqdm bar on stderr, drawn only when stderr is a terminal."""
    from tqdm import tqdm

    # tqdm's monitor thread (started even by a disabled bar) would outlive the bar, and the job.
    tqdm.monitor_interval = 0
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    if not kw["file"].isatty():
        kw["disable"] = True
    return tqdm(**kw)


HELP_WIDTH = 100
"""Columns of a `--help` line: one line per option, cut with '...' past this."""
USER_ERROR = 2
"""Exit code of every entry point for a mistake in what the user gave (argparse's convention)."""


def fail(message: str) -> None:
    """Print `error: <message>` as one line on stderr and exit with USER_ERROR."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(USER_ERROR)


def fail_on(err: BaseException) -> None:
    """`fail` with the first line of an exception's message."""
    fail(str(err).split("\n")[0] or type(err).__name__)


def one_line(err: BaseException) -> str:
    """The informative first lines of an error and of its direct cause (Hydra wraps OmegaConf's
    error, which says what is wrong), joined into one."""
    lines, hints = [], []
    for e in (err, err.__cause__) if err.__cause__ is not None else (err,):
        for line in str(e).splitlines():
            if not line.strip() or line.startswith((" ", "\t", "Set the env")):
                break
            line = line.strip().rstrip(".")
            if line not in lines and line not in hints:
                (hints if line.startswith("To append") else lines).append(line)
    text = ": ".join(lines) + (f" ({hints[0][0].lower()}{hints[0][1:]})" if hints else "")
    return text or type(err).__name__


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Where launchers (Lightning's DDP, torchrun, SLURM, LSF) put a process's rank, first found wins
(the order Lightning reads them in)."""


def global_rank() -> int:
    """This process's DDP rank, 0 outside DDP."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run_or_exit(fn, user_errors: tuple[type[BaseException], ...] = ()):
    """Run `fn` (returning the output directory) and print the directory as the last line, on
    rank 0 only; a mistake in what the user gave (`ValueError`, `FileNotFoundError`, Hydra's and
    OmegaConf's errors, and `user_errors`) prints one line `error: ...` and exits USER_ERROR."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    errors = (ValueError, FileNotFoundError, OmegaConfBaseException, HydraException, *user_errors)
    try:
        out = fn()
    except errors as err:
        fail_on(err)
    if global_rank() == 0:  # DDP ranks Lightning started run this too; one line, printed last
        print(out)
    return out


def check_sae_choices(argv: list[str], conf_dir) -> None:
    """Fail in one line on an unknown `sae=<kind>` before Hydra composes (whose own message is
    a multi-line report); comma lists are multirun choices."""
    import pathlib

    known = sorted(p.stem for p in (pathlib.Path(conf_dir) / "sae").glob("*.yaml"))
    for arg in argv:
        if re.fullmatch(r"sae=\w+\(.*\)", arg):
            continue  # choice(...), glob(...): Hydra expands and checks them
        if arg.startswith("sae="):
            for choice in arg.removeprefix("sae=").split(","):
                if choice not in known:
                    fail(f"unknown SAE kind sae={choice}; choose one of {known}.")


def _flat_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        keys.append(path)
        try:
            child = node._get_node(key)
        except Exception:  # an interpolation or a missing value: keep the key itself
            continue
        if isinstance(child, DictConfig):
            keys += _flat_keys(child, path + ".")
    return keys


def _suggestion(err_text: str, conf_dir, config_name: str) -> str:
    """' (did you mean ...?)' for an unknown key or config-group choice, else ''."""
    import difflib

    if m := re.search(r"Could not override '([^']+)'", err_text):
        key = m.group(1)
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            candidates = _flat_keys(compose(config_name))
        candidates += [p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"]
    elif m := re.search(r"Could not find '([^']+)/([^'/]+)'", err_text):
        group, key = m.groups()
        candidates = [f"{group}={p.stem}" for p in (conf_dir / group).glob("*.yaml")]
        key = f"{group}={key}"
    else:
        return ""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


RENAMED = {
    "visualize": {
        "dump_to": "out=<dir> (dump_to is record.py's parent of shard directories)",
        "images.root": "data.root=<dir> (the image dataset's root, as in record.py)",
    },
}
"""Keys that an entry point spelled otherwise before: {config: {old key: what to write now}}."""


SWITCHES = {"visualize": ("splice", "probe")}
"""Sub-configs that a bare `name=true|false` turns on or off: short for `name.enabled=...`."""


def expand_switches(argv: list[str], config_name: str) -> list[str]:
    """`argv` with each switch written as its `enabled` field (`splice=true` ->
    `splice.enabled=true`), so that `splice=true splice.n_images=64` composes; a switch given
    anything but true or false fails in one line."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in SWITCHES.get(config_name, ()):
            if value.lower() not in ("true", "false"):
                fail(f"{key}={value}: write {key}=true or {key}=false.")
            arg = f"{key}.enabled={value.lower()}"
        out.append(arg)
    return out


def check_renamed(argv: list[str], config_name: str) -> None:
    """Fail in one line on a key this entry point used to spell otherwise, naming the new one."""
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in RENAMED.get(config_name, {}):
            fail(f"{key}= was renamed: write {RENAMED[config_name][key]}.")


def check_command_line(argv: list[str], conf_dir, config_name: str, axes=None, check=None) -> None:
    """Fail in one line, exit USER_ERROR, on what Hydra would reject while composing (an unknown
    key, naming the nearest known one; a value of the wrong type; an unknown config-group
    choice), before Hydra's multi-line report. A multirun is checked with the first value of each
    of its axes (`axes(overrides)`: {key: one override per value}; `train.py` passes the sweep's
    own, `saev.train.sweep.axes`); flags this does not model (--cfg, --config-name, ...) skip the
    check. `check(cfg)`, if given, checks the composed config further (paths), raising
    `FileNotFoundError` or `ValueError`."""
    import pathlib

    conf_dir = pathlib.Path(conf_dir)
    check_renamed(argv, config_name)
    multirun = bool({"-m", "--multirun"} & set(argv))
    args = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        overrides = OverridesParser.create().parse_overrides(args)
        if multirun:
            # A glob needs the config loader to expand (the sweeper has it); leave it to it.
            overrides = [o for o in overrides if o.value_type != ValueType.GLOB_CHOICE_SWEEP]
            args = [v[0] for v in (axes or _plain_axes)(overrides).values()]
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name, overrides=args, return_hydra_config=True)
        if check is not None and not multirun:
            check(cfg)
    except FileNotFoundError as err:
        fail_on(err)
    except (ValueError, HydraException, OmegaConfBaseException) as err:
        text, hint = one_line(err), _suggestion(str(err), conf_dir, config_name)
        if hint:  # a typo: the nearest known key, not Hydra's advice to append a new one
            text = re.sub(r" \(to append to your config use [^)]*\)", "", text)
        fail(text + hint)


def _plain_axes(overrides: list) -> dict[str, list[str]]:
    """Hydra's own multirun grid: {key: one override per swept value}."""
    out = {}
    for o in overrides:
        key = o.get_key_element()
        swept = o.is_sweep_override() and o.is_discrete_sweep()
        out[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if swept else [o.input_line]
    return out


def _field_docs(cls) -> dict[str, str]:
    """The first sentence of each field's docstring (the string literal after it)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                text = " ".join(str(after.value.value).split())
                docs[node.target.id] = text.split(". ")[0].rstrip(".")
    return docs


def options(cls, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(dotted name, default, first sentence of its docstring) of every field of a dataclass
    schema, nested dataclasses flattened; fields named in `skip` are left out."""
    import dataclasses

    rows, docs = [], _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += options(type(default), f"{prefix}{f.name}.")
            continue
        shown = "(required)" if default in ("???", dataclasses.MISSING) else repr(default)
        rows.append((f"{prefix}{f.name}", shown, docs.get(f.name, "")))
    return rows


def group_choices(conf_dir, group: str) -> str:
    import pathlib

    return ", ".join(sorted(p.stem for p in pathlib.Path(conf_dir, group).glob("*.yaml")))


def print_help(usage: str, groups: dict[str, str], sections: list[tuple[str, list]]) -> None:
    """`--help`: the usage lines, the config groups this entry point uses with their choices,
    and one line per option (`key=default  what it does`), section by section."""
    print(usage.strip())
    if groups:
        print("\nConfig groups (group=choice):")
        for group, choices in groups.items():
            print(f"  {group}: {choices}")
    for title, rows in sections:
        print(f"\n{title}:")
        width = min(40, max(len(f"{n}={d}") for n, d, _ in rows))
        for name, default, doc in rows:
            line = f"  {f'{name}={default}':<{width}}  {doc}".rstrip()
            print(line if len(line) <= HELP_WIDTH else line[: HELP_WIDTH - 3] + "...")
    sys.exit(0)
