"""`mmrank rank`: score candidates for one history through the gRPC endpoint and print them ranked, with
the item table version that answered and whether the user is known (a note on stderr where --user is
one the model does not know)."""

from __future__ import annotations

import json
import sys

import numpy as np

from clients.ranking_client import ClientConfig, RankingClient, parse_id_list


def cli(args) -> int:
    history = parse_id_list(args.history, "--history")
    candidates = parse_id_list(args.candidates, "--candidates")
    with RankingClient(ClientConfig(url=args.url, timeout_s=args.timeout)) as client:
        ranking = client.rank(history, candidates, args.user)
    scores, known = ranking.scores, ranking.known
    if args.user is not None and not ranking.user_known:
        print(
            f"mmrank rank: note: user {args.user} is not a user the model knows: ranked as the unknown user",
            file=sys.stderr,
        )
    order = np.argsort(-scores, kind="stable")
    ranked = [
        # An unknown candidate has no score (the server's -inf; JSON has no infinity): null, last.
        {
            "item_id": int(candidates[i]),
            "score": float(scores[i]) if known[i] else None,
            "known": bool(known[i]),
        }
        for i in order
    ]
    answer = {
        "history": history,
        "ranked": ranked,
        "user_known": ranking.user_known,
        "item_table_version": ranking.item_table_version,
    }
    print(json.dumps(answer, indent=2))
    return 0
