"""Command line: `python -m app run | serve | worker | sfu | migrate | demo-data | create-admin --phone ...`."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.accounts.service import AccountService
from app.accounts.tokens import TokenIssuer
from app.demo import load_demo
from app.errors import DomainError
from app.limits import InProcessLimiter
from app.migrate import upgrade
from app.notifications.sms import sms_sender
from app.observability import configure_logging
from app.settings import Settings, settings_from_env


async def _with_session(settings: Settings, work: object) -> object:
    engine = create_async_engine(settings.resolved_database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            return await work(session)  # type: ignore[operator]
    finally:
        await engine.dispose()


def create_admin(settings: Settings, phone: str, full_name: str | None) -> int:
    async def work(session: object) -> str:
        accounts = AccountService(session, settings, TokenIssuer(settings), InProcessLimiter(),  # type: ignore[arg-type]
                                  sms_sender(settings))
        user = await accounts.ensure_admin(phone, full_name)
        await accounts.session.commit()
        return f"admin {user.phone} ({user.full_name or 'no name'}) id {user.id}"

    try:
        print(asyncio.run(_with_session(settings, work)))
    except DomainError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    return 0


def demo(settings: Settings) -> None:
    async def work(session: object) -> object:
        return await load_demo(session, settings)  # type: ignore[arg-type]

    rows = asyncio.run(_with_session(settings, work))
    if isinstance(rows, list):
        print("Demo clinic loaded. Sign in with any of these phones; codes go to", settings.resolved_sms_log_path)
        for phone, name, role in rows:
            print(f"  {phone:14} {name:24} {role}")
    else:
        print("Demo clinic already loaded (admin +79160000001, patients +79161110001, +79161110002).")


def serve(settings: Settings) -> None:
    workers = settings.workers
    if workers > 1 and not settings.redis_url:  # the in-process bus cannot reach a sibling process's sockets
        print("WORKERS > 1 needs REDIS_URL; serving with one worker", file=sys.stderr)
        workers = 1
    print(f"Clinic API: http://{settings.host}:{settings.port}  (docs: /schema, health: /health/ready)", flush=True)
    uvicorn.run("app.main:app_from_env", factory=True, host=settings.host, port=settings.port, workers=workers,
                log_config=None, access_log=False, lifespan="on",
                # uvicorn would believe X-Forwarded-For from 127.0.0.1; app/clientaddr.py alone decides whom to
                # believe (TRUSTED_PROXIES), so a local peer cannot pick the address the OTP limits count
                proxy_headers=False,
                http="app.http_head:BoundedHead",  # httptools with a bound on a request's headers (431 past it)
                # the websockets implementation refuses a larger client message with 1009 from its header,
                # before reading it (uvicorn's default lets each socket buffer 16 MB)
                ws="websockets-sansio", ws_max_size=settings.ws_max_frame_bytes)


def outbox_worker(settings: Settings) -> int:
    if settings.resolved_database_url.startswith("sqlite"):  # one process: the API's own worker sends
        print("the outbox worker runs inside the API on SQLite; `worker` needs DATABASE_URL (PostgreSQL)",
              file=sys.stderr)
        return 2
    from app.notifications.worker import run_worker

    configure_logging(settings.log_level)
    asyncio.run(run_worker(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="migrate, load demo data if DEMO_DATA is set, serve")
    commands.add_parser("serve", help="serve the API")
    commands.add_parser("migrate", help="apply database migrations")
    commands.add_parser("worker", help="send the outbox's pushes and reminders (PostgreSQL; Redis for presence)")
    commands.add_parser("sfu", help="run an SFU node: SFU_LISTEN, SFU_PUBLIC_URL, SFU_SECRET, REDIS_URL (registry)")
    commands.add_parser("demo-data", help="migrate, then load the demo clinic (once: a loaded clinic is left as it is)")
    admin = commands.add_parser("create-admin", help="make (or promote) an admin account")
    admin.add_argument("--phone", required=True, help="the admin's phone, as they sign in with it (+7...)")
    admin.add_argument("--full-name", help="the name shown to staff")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_env()
    if args.command == "create-admin":
        upgrade(settings.resolved_database_url)
        return create_admin(settings, args.phone, args.full_name)
    if args.command in ("migrate", "run", "demo-data"):
        upgrade(settings.resolved_database_url)
    if args.command == "demo-data" or (args.command == "run" and settings.demo_data):
        demo(settings)
    if args.command in ("run", "serve"):
        serve(settings)
    if args.command == "worker":
        return outbox_worker(settings)
    if args.command == "sfu":
        from app.rtc.sfu.node import run_node  # imported for this command only: aiortc is slow to import

        return run_node(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
