"""Fleet builds: one fat checkpoint compiled for many robots, each target a task on an executor.

`xcompile build CKPT --target a1,spot,panda` or `--fleet fleet.toml` builds every target with the
same plan and settings (a fleet file may set `hardware`, `profile`, `episodes` and `seed` per
target, which win over the command line's for that target), all sharing one pass cache. Every
target is a task (`build_target`) on an executor (`xcompile.executors`): in this process, a local
process pool or Ray. A task gets plain data (`FleetJob`: paths, names, the plan as JSON) and loads
and checks the robot, hardware and checkpoint files itself; its artifacts go through files (the
cache folder and its output folder), never through pickled modules. One target's failure is its
row in the fleet report, never the end of the others.

The fleet folder (`--out DIR`) holds `DIR/<robot>/` for each target, exactly a single build's
folder (`xcompile.build.run_build`), the reproducer of a failed pass (`DIR/<robot>.repro`), the
fleet report (`report.md`, `report.json`: target x final score with its 95% interval, bytes, p50
latency, build time, gates, error) and `fleet.json`, the marker that lists what the fleet wrote.
It obeys the rule of `xcompile.outdir`: it is assembled in a temporary folder beside DIR and
swapped in when every target has finished, and DIR is replaced only when it is empty or holds an
earlier fleet and nothing that fleet did not write (`--force` also replaces extra files), and
every earlier target folder in it is one xcompile may replace.

Pass-cache entries are committed by renaming a finished work folder into place, and targets have
different cache keys (the robot is in the key), so the tasks of one fleet never write the same
entry.

Modules: `spec` (targets, fleet TOML, jobs), `build` (the task, `run_fleet`, the report), `folder`
(the fleet folder's safety rule and atomic write).
"""

from xcompile.fleet.build import (
    build_target,
    exit_code,
    fleet_table,
    render_fleet_markdown,
    run_fleet,
)
from xcompile.fleet.folder import FLEET_MARKER, check_fleet_dir, write_fleet_dir
from xcompile.fleet.spec import (
    FleetJob,
    FleetTarget,
    parse_targets,
    prepare_jobs,
    read_fleet_file,
)

__all__ = ["FLEET_MARKER", "FleetJob", "FleetTarget", "build_target", "check_fleet_dir",
           "exit_code", "fleet_table", "parse_targets", "prepare_jobs", "read_fleet_file",
           "render_fleet_markdown", "run_fleet", "write_fleet_dir"]
