"""`genset chat`: talk to a model over NATS (no HTTP), interactively or one-shot.

    genset chat                       # REPL; /reset clears the conversation, /exit or Ctrl-D quits
    genset chat --prompt "Hello!"     # one answer, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from genset.client import Client, ClientError
from genset.runtime.config import DefaultsHelpFormatter


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genset chat", description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--nats", default=os.environ.get("GENSET_NATS", "nats://127.0.0.1:4222"),
                   help="NATS server URL [env GENSET_NATS]")
    p.add_argument("--namespace", default=os.environ.get("GENSET_NAMESPACE", "default"),
                   help="genset namespace [env GENSET_NAMESPACE]")
    p.add_argument("--state-dir", default=os.environ.get("GENSET_STATE_DIR", ".state"),
                   help="the state directory of the `genset up` stack to chat with: its "
                        "credentials are read from there (default .state)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--prompt", help="ask one question, print the answer and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--usage", action="store_true", help="print token usage after each answer")
    return p


async def _answer(client: Client, messages: list[dict], args, out) -> str:
    parts: list[str] = []
    async for chunk in client.chat(messages, model=args.model, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=args.seed):
        if chunk.text:
            parts.append(chunk.text)
            out.write(chunk.text)
            out.flush()
        if chunk.usage is not None and args.usage:
            u = chunk.usage
            out.write(f"\n[{chunk.finish_reason}; prompt {u.prompt_tokens}, completion "
                      f"{u.completion_tokens}, cached {u.cached_tokens} tokens]")
    out.write("\n")
    out.flush()
    return "".join(parts)


def _nats_login(args) -> dict[str, str | None]:
    """The NATS user to chat as: GENSET_NATS_USER/_PASSWORD when set, else the `client` user
    of the stack `genset up` started with its state in --state-dir (secure by default)."""
    user = os.environ.get("GENSET_NATS_USER")
    if user:
        return {"user": user, "password": os.environ.get("GENSET_NATS_PASSWORD")}
    from genset.runtime.auth import ROLE_CLIENT, read_credentials

    creds = read_credentials(Path(args.state_dir) / "auth")
    if creds is None:
        return {"user": None, "password": None}
    return {"user": ROLE_CLIENT, "password": creds.password(ROLE_CLIENT)}


async def _run(args) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        client = await Client(args.nats, namespace=args.namespace,
                              **_nats_login(args)).__aenter__()
    except Exception as exc:
        print(f"genset chat: {exc}", file=sys.stderr)
        return 1
    try:
        if args.prompt is not None:
            await _answer(client, [*system, {"role": "user", "content": args.prompt}], args,
                          sys.stdout)
            return 0
        history: list[dict] = []
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await loop.run_in_executor(None, input, "> ")
            except EOFError:
                print()
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history.clear()
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = await _answer(client, [*system, *history], args, sys.stdout)
            except ClientError as exc:
                history.pop()
                print(f"error: {exc}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": reply})
    except ClientError as exc:
        print(f"genset chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from genset.runtime.logging import configure_logging

    # A chat session shows the conversation; connection retries are not news (errors still are).
    configure_logging("console", "error", service="chat")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
