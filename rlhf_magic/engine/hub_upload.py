"""`handle.push_to_hub(repo_id)`: the handle saved into a temporary folder and uploaded through huggingface_hub."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError


def check_repo_id(repo_id: Any) -> str:
    """`repo_id` as given when it has the form 'user/name' the Hub accepts, else a one-line ConfigError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        problem = "it needs one '/' between the user (or organisation) and the name"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problem = str(e).splitlines()[0].rstrip(".")
    if problem:
        raise ConfigError(
            f"repo_id = {repo_id!r} is not valid ({problem}); expected 'user/name' of letters, digits, '-', '_' "
            f"and '.', at most 96 characters"
        )
    return repo_id


def push_to_hub(handle: Any, repo_id: str, *, private: bool = True, merged: bool = True, token: Any = None) -> str:
    """Save `handle` into a temporary folder, then create the model repo (private by default) and upload the folder
    in one commit that also removes the files of an earlier push. Nothing reaches the Hub when the repo id is
    malformed or the save fails. Returns the repo URL."""
    import tempfile

    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id)
    if handle.kind != "policy" and not merged:
        raise ConfigError(f"merged=False applies to policies; a {handle.kind} model is always saved whole")
    if constants.is_offline_mode() or constants._is_true(os.environ.get("HF_HUB_OFFLINE")):
        raise ModelError(f"push_to_hub({repo_id!r}) needs the Hub, and HF_HUB_OFFLINE=1 forbids it; unset it first")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="rlhf-magic-push-") as tmp:
        folder = Path(tmp) / "model"
        if handle.kind == "policy":
            handle.save(folder, merged=merged)
        else:
            handle.save(folder)
        with _hub_refusals(repo_id):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=f"rlhf-magic: {handle.stage} result {handle.name!r}",
                delete_patterns="*",  # files of an earlier push go (a merged model and an adapter never mix)
            )
    return str(url)


@contextlib.contextmanager
def _hub_refusals(repo_id: str) -> Iterator[None]:
    """huggingface_hub's HTTP errors -> one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import first_line

    try:
        yield
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = "log in (`hf auth login`) or pass token=" if status in (401, 403) else "check the repo id and try again"
        raise ModelError(f"push_to_hub({repo_id!r}): the Hub refused ({first_line(e)}); {fix}") from None
    except Exception as e:
        if not any(c.__name__ == "TransportError" for c in type(e).__mro__):  # httpx's (huggingface_hub's client)
            raise
        raise ModelError(
            f"push_to_hub({repo_id!r}): the Hub at {constants.ENDPOINT} cannot be reached ({first_line(e)}); check "
            f"the connection (or HF_ENDPOINT)"
        ) from None
