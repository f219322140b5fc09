"""``bdr certs`` and ``bdr secret``: create the credentials the daemons authenticate each other with."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .targets import SetupError


def make_certs(args: argparse.Namespace) -> None:
    from bdr.security import certs  # the cryptography package is needed here only

    try:
        issued = certs.make(Path(args.out), tuple(args.server_name), args.client_name, args.days, args.force)
    except certs.CertError as exc:
        raise SetupError(str(exc)) from exc
    out = issued.out
    print(
        f"{'reused' if issued.reused_ca else 'created'} CA {out / 'ca.pem'} (key {out / 'ca.key'}: keep it offline)"
    )
    print(
        f"server certificate for {', '.join(issued.server_names)}: {out / 'server.pem'}, {out / 'server.key'}"
    )
    print(f"client certificate {issued.client_name!r}: {out / 'client.pem'}, {out / 'client.key'}")
    print("on the server:")
    print("  bdr_server ... --tls-cert server.pem --tls-key server.key --tls-ca ca.pem")
    print("on the client:")
    print(
        f"  bdr_client ... --address {issued.server_names[0]} --tls-ca ca.pem --tls-cert client.pem --tls-key client.key"
    )


def make_secret(args: argparse.Namespace) -> None:
    from bdr.security import auth

    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.file, flags, 0o600)
    except FileExistsError:
        raise SetupError(f"{args.file} exists; use --force to replace it") from None
    except OSError as exc:
        raise SetupError(f"cannot write {args.file}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(auth.new_secret())
    print(
        f"wrote a new shared secret to {args.file} (mode 0600); copy it to the other host over a trusted channel"
    )
    print(f"  bdr_server ... --secret-file {args.file}")
    print(f"  bdr_client ... --secret-file {args.file}")
