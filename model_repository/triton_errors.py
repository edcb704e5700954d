"""Triton's own refusals of a request, said so that a user can act on them.

Triton checks a request against the model's config before any postsim model sees it, and
two of its messages mislead:

- A request with an input the model does not take, on top of the ones it does, fails
  Triton's count of inputs. Its message then lists the required inputs that are missing;
  with none missing, the code that formats the list drops its opening bracket along with
  the trailing comma, and the message ends "but missing required input(s) ]." without
  naming the input that is too many.
- A request of 0 posts (shape ``[0, 1]``) is counted as one post with no data: "expected 1
  string elements for inference input 'TEXT' ..., got 0", the same message as a post whose
  data is missing.

:func:`explain` rewrites these two with the model's inputs from the contract; any other
message comes back unchanged. The client applies it to every INVALID_ARGUMENT it reports;
a front end that forwards raw requests can apply it to the responses.
"""

from __future__ import annotations

import re

from postsim.model_repository import contract

_INPUT_COUNT = re.compile(
    r"expected (?:\d+ inputs|number of inputs between \d+ and \d+) but got \d+ inputs for model '(?P<model>[^']+)'\. "
    r"Got input\(s\) \[(?P<got>[^\]]*)\]"
)
_NO_ELEMENTS = re.compile(
    r"expected \d+ string elements for inference input '(?P<input>[^']+)' "
    r"for model '(?P<model>[^']+)', got 0\b"
)
_QUOTED = re.compile(r"'([^']*)'")


def explain(message: str) -> str:
    """``message`` with Triton's misleading input-count and empty-batch refusals reworded."""
    counted = _INPUT_COUNT.search(message)
    if counted:
        return _input_count(counted) or message
    empty = _NO_ELEMENTS.search(message)
    if empty:
        name, model = empty.group("input"), empty.group("model")
        return (
            f"model '{model}': input '{name}' holds no element: the request holds no post (a batch of 0), "
            f"or no data for its {name}; send at least one post, with one {name} element each (empty bytes for none)"
        )
    return message


def _input_count(found: re.Match[str]) -> str | None:
    model = found.group("model")
    spec = contract.model_specs().get(model)
    if spec is None:  # not a postsim model: its inputs are not known here
        return None
    allowed = spec.input_names
    got = _QUOTED.findall(found.group("got"))
    unexpected = [name for name in got if name not in allowed]
    missing = [name for name in allowed if name not in got]
    problems = ([f"it does not take {unexpected}"] if unexpected else []) + (
        [f"the request lacks {missing}"] if missing else []
    )
    return f"model '{model}' takes the inputs {allowed} and no others: " + "; ".join(problems)
