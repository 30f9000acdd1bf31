"""``python -m glmtrain [group=option ...] [key=value ...]`` -- the Hydra entry point.

Everything a user can get wrong ends in ONE line on stderr and exit status 2, before anything runs:

* the overrides are composed first (:func:`precheck`): an unknown key (with or without ``+``), an
  unknown group option or an override Hydra cannot parse gets glmtrain's one line instead of
  Hydra's multi-line report (status 1);
* the composed config is validated against the structured schema (types, ranges, combinations),
  then against this machine (:func:`glmtrain.config.check_machine`: GPUs, backends, launchers) --
  no trainer, no process group, no subprocess, no file yet;
* data, checkpoint, run-directory and environment failures during the run (disk full, read-only or
  missing directories, permissions) are reported with their cause and path.

Status 75 (EX_TEMPFAIL): the run stopped early with a checkpoint (a signal, or ``trainer.max_time_s``);
rerunning the same command continues it.
"""

from __future__ import annotations

import errno
import os
import sys

import hydra
from omegaconf import DictConfig, open_dict

from glmtrain import CONF_DIR, earlysignals

EX_TEMPFAIL = 75


def _fail(msg: str) -> None:
    print(f"glmtrain: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.ENOENT: "no such file or directory",
           errno.ENOTDIR: "not a directory", errno.EIO: "input/output error"}


def environment_error(e: OSError, run_dir: str) -> str:
    """An OSError from the run as one line: cause, path, what to do."""
    cause = _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    path = e.filename or run_dir
    return f"{cause}: {path} ({e.strerror or e}); free space / fix the permissions there, or choose another run_dir=..."


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def given_keys(overrides: list[str]) -> set[str]:
    """The config keys a list of overrides sets (``a.b=1``, ``+a.b=1`` -> ``a.b``; groups included)."""
    return {_override_key(o) for o in overrides if "=" in o}


def precheck(overrides: list[str]) -> list[str]:
    """Compose ``overrides`` as Hydra will and turn a composition error into one line (exit 2).

    Returns the overrides to run with: a key the schema knows but the chosen option's YAML does not list
    (e.g. ``strategy.sequence_parallel`` under ``strategy=fsdp``) gets the ``+`` Hydra wants for it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    from glmtrain.config import ConfigError, validate

    def _compose(ovs):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose("config", overrides=ovs, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices...} in the defaults resolve
            with open_dict(cfg):
                cfg.pop("hydra")
            return cfg

    ovs = list(overrides)
    for _ in range(len(ovs) + 1):
        try:
            cfg = _compose(ovs)
        except OverrideParseException as e:
            bad = next((o for o in ovs if o.count("=") > 1 or " " in o), None)
            hint = (f" in {bad!r}; quote a value that holds '=' or spaces: '{bad.split('=', 1)[0]}=\"{bad.split('=', 1)[1]}\"'"
                    if bad and "=" in bad else "")
            _fail(f"cannot parse the overrides ({str(e).splitlines()[0]}){hint}")
        except MissingConfigException as e:
            opts = ", ".join(sorted(e.options or [])) if getattr(e, "options", None) else ""
            first = str(e).splitlines()[0].replace("In 'config': ", "")
            _fail(f"{first}" + (f"; available: {opts}" if opts else ""))
        except HydraException as e:
            msg = str(e)
            # a key the composed YAML lacks, given without '+': add it and let the schema judge it
            missing = [o for o in ovs if not o.startswith(("+", "~")) and f"'{_override_key(o)}'" in msg]
            if not missing:
                _fail(f"config: {msg.splitlines()[0]}")
            ovs = [("+" + o if o in missing else o) for o in ovs]
            continue
        if ovs != list(overrides):
            try:
                validate(cfg)  # the same one line for an unknown key, with or without '+'
            except ConfigError as e:
                _fail(f"config: {e}")
        return ovs
    _fail("config: the overrides do not compose")
    return ovs


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run_config(cfg)


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under hydra.main (in-process callers): the process's own arguments
        return [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]


def run_config(cfg: DictConfig) -> None:
    """Validate, check the machine, train; every failure a user can act on is one line (exit 2 / 75)."""
    from glmtrain.checkpointing import CheckpointError
    from glmtrain.config import ConfigError, check_machine, validate
    from glmtrain.data.fasta import DataInputError
    from glmtrain.schedule import check

    try:
        run = validate(cfg, given=given_keys(_command_line_overrides()))
        check_machine(run)
        check(run)  # every stage against data, model, strategy and world size
    except ConfigError as e:
        _fail(f"config: {e}")
    from glmtrain.cluster import FLAG
    from glmtrain.faults import NumericalFault
    from glmtrain.locks import LockBusy
    from glmtrain.train import train

    # from here to the end of the process a preemption signal only sets a flag (glmtrain.cluster); the
    # ones that arrived while Python was importing are handed over and acted on at the first step boundary
    earlysignals.hand_over(FLAG, run.trainer.signals)

    try:
        result = train(run)
    except (DataInputError, CheckpointError, ConfigError, NumericalFault, LockBusy) as e:
        _fail(str(e))
    except OSError as e:
        _fail(environment_error(e, run.run_dir))
    if result.get("interrupted") or result.get("stopped"):
        # EX_TEMPFAIL: stopped after a checkpoint, not finished; rerunning (or the requeued job) resumes.
        # Non-zero so that a SLURM job that could not requeue is not COMPLETED (an afterok chain waits).
        sys.exit(EX_TEMPFAIL)


def entry() -> None:
    earlysignals.install()  # (python -m glmtrain did so before importing anything else)
    # Hydra would otherwise print a full stack trace for our one-line errors.
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # --help, --cfg, -m ...: Hydra's own business
        sys.argv[1:] = precheck(args)
    main()


if __name__ == "__main__":
    entry()
