"""Where independent work runs (serial, a local process pool, Ray) and evaluation split over it.

`pools`: the serial and process executors; `ray_pool`: the Ray one (Ray imported only when used);
`factory`: `make_executor`; `rollouts`: `evaluate_file`, closed-loop evaluation cut into episode
chunks with the same scores on every executor.
"""

from xcompile.executors.factory import current_executor, make_executor, use_executor
from xcompile.executors.pools import EXECUTORS, Executor, TaskError
from xcompile.executors.rollouts import PolicyRef, evaluate_file

__all__ = ["EXECUTORS", "Executor", "PolicyRef", "TaskError", "current_executor", "evaluate_file",
           "make_executor", "use_executor"]
