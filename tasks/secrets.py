"""Secret values by reference: ``prefect-secret://<block>`` → the Prefect Secret block's value.

A database or tracking URL with a password is kept out of study configs, saved configs,
flow parameters and logs by writing a reference instead, in the config
(``study.storage: prefect-secret://optuna-db``) or in the environment
(``EDGETUNE_STORAGE=prefect-secret://optuna-db``). The reference is resolved where the
value is used, on the host that uses it, so only that host's process ever holds the
password. Any other value is returned unchanged.

Create the block once per Prefect server::

    python -c "from prefect.blocks.system import Secret; \\
Secret(value='postgresql+psycopg2://optuna:PASSWORD@db:5432/optuna').save('optuna-db')"

or in the Prefect UI (Blocks → Secret).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tasks.tracking import one_line

SCHEME = "prefect-secret://"
#: Prefect block document names: lowercase letters, digits and dashes.
BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class SecretError(ValueError):
    """A secret reference that cannot be resolved; one line naming the block and the fix."""


def is_secret_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def secret_block_name(reference: str, *, key: str) -> str:
    """The block name of ``prefect-secret://<name>``, checked; ``key`` names the setting."""
    name = reference.removeprefix(SCHEME).strip().strip("/")
    if not BLOCK_NAME.match(name):
        raise SecretError(
            f"{key}: {reference!r} does not name a Prefect Secret block; write "
            f"{SCHEME}<name> with a block name of lowercase letters, digits and dashes"
        )
    return name


def _load_block(name: str) -> Any:
    """The stored value of the Secret block ``name`` (the Prefect API of this process)."""
    # Prefect loads only when a secret is resolved: parsing a config stays light.
    from prefect.blocks.system import Secret

    # _sync: also from inside a running event loop (Block.load would return a coroutine)
    load: Any = Secret.load
    return load(name, _sync=True).get()


def resolve_secret(
    value: str | None, *, key: str, load: Callable[[str], Any] | None = None
) -> str | None:
    """``value`` itself, or the string held by the Secret block it references.

    ``key`` is the setting the value came from (``study.storage``, ``$EDGETUNE_STORAGE``),
    for the error message; ``load`` replaces the Prefect lookup (tests). The resolved value
    is never part of an error message.
    """
    if not is_secret_ref(value):
        return value
    assert value is not None  # is_secret_ref
    name = secret_block_name(value, key=key)
    loader = load or _load_block
    try:
        secret = loader(name)
    except ValueError as exc:  # Prefect: "Unable to find block document named …"
        if "Unable to find block document" not in str(exc):
            raise SecretError(
                f"{key}: the Prefect Secret block {name!r} cannot be read "
                f"({type(exc).__name__}); recreate it with Secret(value=...).save({name!r})"
            ) from None
        raise SecretError(
            f"{key}: no Prefect Secret block named {name!r} on this Prefect server; create it "
            f"with Secret(value=...).save({name!r}) or in the UI (Blocks → Secret), or check "
            f"PREFECT_API_URL"
        ) from None
    except Exception as exc:
        raise SecretError(
            f"{key}: cannot read the Prefect Secret block {name!r} ({type(exc).__name__}: "
            f"{one_line(exc, 200)}); check that the Prefect server at PREFECT_API_URL is "
            f"running"
        ) from None
    if not isinstance(secret, str) or not secret.strip():
        kind = "an empty string" if isinstance(secret, str) else f"a {type(secret).__name__}"
        raise SecretError(
            f"{key}: the Prefect Secret block {name!r} holds {kind}; save the URL itself as "
            f"a string: Secret(value='dialect://user:password@host/db').save({name!r}, "
            f"overwrite=True)"
        )
    if is_secret_ref(secret):
        raise SecretError(
            f"{key}: the Prefect Secret block {name!r} holds another reference; save the URL "
            f"itself in it"
        )
    return secret.strip()
