"""`mmrank rank`: score candidates for one history through the gRPC endpoint and print them ranked."""

from __future__ import annotations

import json

import numpy as np

from clients.ranking_client import ClientConfig, RankingClient, parse_id_list


def cli(args) -> int:
    history = parse_id_list(args.history, "--history")
    candidates = parse_id_list(args.candidates, "--candidates")
    with RankingClient(ClientConfig(url=args.url, timeout_s=args.timeout)) as client:
        scores, known = client.rank(history, candidates, args.user)
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
    print(json.dumps({"history": history, "ranked": ranked}, indent=2))
    return 0
