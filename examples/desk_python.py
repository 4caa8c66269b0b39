#!/usr/bin/env python3
"""A Desk client that cannot change its URL, as many published ones are.

It talks to https://desk.zoho.com and gets its own token from https://accounts.zoho.com
with the client_credentials grant, the way a ticket loader from PyPI does. Run it
unchanged through zoho-desk-proxy's transparent mode (README "Clients that cannot change
their URL"):

    cargo run --release -- demo --intercept          # one shell
    eval "$(cargo run -q --release -- env)"           # another shell
    python3 examples/desk_python.py

The proxy answers the token request itself with a placeholder and forwards the Desk
calls with its real token: this script needs no credentials, and never sees any.
Needs the `requests` package (Debian: python3-requests).
"""

import os
import sys

import requests

ACCOUNTS = "https://accounts.zoho.com"
DESK = "https://desk.zoho.com"


def token(session: requests.Session) -> str:
    """An access token from Zoho Accounts, as the client would fetch it."""
    answer = session.post(
        f"{ACCOUNTS}/oauth/v2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": os.environ.get("ZOHO_CLIENT_ID", "1000.EXAMPLECLIENTID"),
            "client_secret": os.environ.get("ZOHO_CLIENT_SECRET", "not-a-real-secret"),
            "scope": "Desk.tickets.READ,Desk.basic.READ",
            "soid": "Desk." + os.environ.get("ZOHO_ORG_ID", "60001234567"),
        },
        timeout=10,
    )
    answer.raise_for_status()
    return answer.json()["access_token"]


def main() -> int:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Zoho-oauthtoken {token(session)}"
        session.headers["orgId"] = os.environ.get("ZOHO_ORG_ID", "60001234567")
        answer = session.get(f"{DESK}/api/v1/tickets", params={"from": 0, "limit": 10}, timeout=10)
        if answer.status_code != 200:
            print(f"Desk answered {answer.status_code}: {answer.text}", file=sys.stderr)
            return 1
        tickets = answer.json().get("data", [])
        for ticket in tickets:
            print(f"#{ticket['ticketNumber']}  {ticket['status']:<8}  {ticket['subject']}")
        print(f"{len(tickets)} tickets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
