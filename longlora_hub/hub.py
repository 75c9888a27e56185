"""What every push to the Hub shares: the token check before any work, and one clear message per failure (no token,
a refused token, no write access, an unreachable Hub) instead of an HTTP traceback."""

from __future__ import annotations


class HubPushError(RuntimeError):
    """The Hub push cannot proceed: no token, an unreachable Hub, or a refused upload."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP client huggingface_hub uses (its name varies by version)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


def hub_errors() -> tuple[type[BaseException], ...]:
    """Everything a Hub call can raise that `hub_failure` turns into a message."""
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, *transport_errors())


def hub_failure(error: BaseException, endpoint: str, action: str) -> HubPushError:
    """The message for a failed Hub call: what was being done, what went wrong, what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return HubPushError(
                f"The Hub at {endpoint} rejected the token while trying to {action} (401). Log in again with "
                "`hf auth login` or set a valid HF_TOKEN."
            )
        if status == 403:
            return HubPushError(
                f"The token may not write there (403) while trying to {action}: use a token with write access "
                "(and, for an organization's repository, membership with write rights)."
            )
        return HubPushError(f"The Hub at {endpoint} refused to {action}: {error}")
    return HubPushError(
        f"Cannot reach the Hub at {endpoint} to {action} ({type(error).__name__}: {error}). Check the network, or "
        "HF_ENDPOINT if you use another Hub server."
    )


def check_hub_access(token: str | None = None, endpoint: str | None = None, no_token_hint: str = "") -> str:
    r"""
    Check, before any work, that a push can succeed: a token is there and the Hub answers to it.

    Args:
        token (`str`, *optional*): Defaults to the logged-in token (`HF_TOKEN` or `hf auth login`).
        endpoint (`str`, *optional*): Defaults to `HF_ENDPOINT` / huggingface.co.
        no_token_hint (`str`, *optional*): Appended to the no-token message (e.g. how to go on without a push).

    Returns:
        `str`: The token to push with.

    Raises:
        `HubPushError`: No token, the token is refused, or the Hub cannot be reached.
    """
    from huggingface_hub import HfApi, constants, get_token

    endpoint = endpoint or constants.ENDPOINT
    token = token or get_token()
    if not token:
        raise HubPushError(
            "No Hugging Face token found, so nothing can be pushed: run `hf auth login` or set HF_TOKEN (a token "
            f"with write access){no_token_hint}."
        )
    try:
        HfApi(endpoint=endpoint, token=token).whoami()
    except hub_errors() as error:
        raise hub_failure(error, endpoint, "check the token") from error
    return token


__all__ = ["HubPushError", "check_hub_access", "hub_errors", "hub_failure", "transport_errors"]
