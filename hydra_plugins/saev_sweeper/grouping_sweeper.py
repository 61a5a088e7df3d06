"""`GroupingSweeper`: Hydra's multirun for `train.py`, one job per group of SAEs that can share a
data stream (`conf/hydra/sweeper/grouping.yaml`; logic and syntax: `saev.sweep`, docs/sweeps.md).

Hydra imports every module under `hydra_plugins` when it starts, so this one imports only Hydra
at the top; `saev` (torch, Lightning) is imported when a sweep begins.
"""

import dataclasses
import logging
import pathlib
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GroupingSweeperConf:
    """`hydra.sweeper` of `train.py -m`."""

    _target_: str = "hydra_plugins.saev_sweeper.grouping_sweeper.GroupingSweeper"
    max_saes_per_job: int | None = None
    """At most this many SAEs per job; a larger group is split into even jobs. None: no cap."""
    params: dict[str, str] | None = None
    """Overrides swept like command-line ones ({key: "a,b"}), as in Hydra's basic sweeper;
    the command line comes after them."""
    grids: list[dict[str, Any]] | None = None
    """Grids whose union is swept, each crossed with the other overrides, e.g.
    [{sae: relu, sae.sparsity_coeff: "4e-4,8e-4"}, {sae: topk, sae.k: "32,64"}]. None: none."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="grouping_schema", node=GroupingSweeperConf, provider="saev"
)


class GroupingSweeper(Sweeper):
    def __init__(self, max_saes_per_job=None, params=None, grids=None) -> None:
        super().__init__()
        self.max_saes_per_job = max_saes_per_job
        self.params = OmegaConf.to_container(params) if OmegaConf.is_config(params) else params
        self.grids = OmegaConf.to_container(grids) if OmegaConf.is_config(grids) else grids
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def compose(self, overrides: list[str]):
        """The full `TrainConfig` of one combination, composed as a job would compose it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_object(cfg)

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from saev import cli
        from saev.train import summary, sweep

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:
            plan = sweep.plan(
                arguments, self.compose, params=self.params, grids=self.grids,
                max_saes_per_job=self.max_saes_per_job, parser=parser,
            )  # fmt: skip
        except Exception as err:  # Hydra's and OmegaConf's errors too: all are the user's input
            cli.fail(cli.one_line(err))
        sweep_dir = pathlib.Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        sweep.save_plan(plan, sweep_dir)
        log.info(f"{plan.n_saes} SAEs in {len(plan.jobs)} jobs; sweep directory {sweep_dir}")
        # Pinning the resolved directory keeps a requeued job's run directory where it was.
        pin = f"hydra.sweep.dir={sweep.quote(str(sweep_dir))}"
        outcomes = self.launch([[*j.launch_overrides(), pin] for j in plan.jobs])
        failed = sweep.finish(plan, sweep_dir, [failure(o) for o in outcomes])
        if failed:
            jobs = list(dict.fromkeys(r["job"] for r in failed))  # plan order
            print(
                f"error: {len(failed)} of {plan.n_saes} SAEs failed (in {', '.join(jobs)}); "
                f"see {sweep_dir / summary.NAME}",
                file=sys.stderr,
                flush=True,
            )
        print(sweep_dir, flush=True)  # the last line, as train.py prints its run directory
        if failed:
            sys.exit(1)
        return outcomes

    def launch(self, job_overrides: list[list[str]]) -> list:
        """One JobReturn (or the exception that stood for it) per job. Hydra's in-process
        launcher never raises for a failing job, so it runs them all in one call; submitit's
        launchers raise for a job that died (killed, out of memory) and stop collecting the
        rest, so each job gets its own call, all in parallel."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        if isinstance(self.launcher, BasicLauncher):
            return list(self.launcher.launch(job_overrides, initial_job_idx=0))

        def one(i: int):
            try:
                return self.launcher.launch([job_overrides[i]], initial_job_idx=i)[0]
            except Exception as err:
                return err

        with ThreadPoolExecutor(max_workers=len(job_overrides)) as pool:
            return list(pool.map(one, range(len(job_overrides))))


def failure(outcome) -> str | None:
    """Why a job failed (one line), or None when it completed."""
    from hydra.core.utils import JobStatus

    from saev.cli import one_line

    if isinstance(outcome, BaseException):
        return one_line(outcome)
    if outcome.status == JobStatus.FAILED:
        return one_line(outcome._return_value)
    return None
