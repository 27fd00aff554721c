"""donor-propensity: how likely a contact is to give this year (logistic regression).

A realtime model in plain Python (standard library only), meeting the model process
contract: an HTTP server on 127.0.0.1:$PORT, `GET /health` -> 200 once the parameters are
loaded, `POST /predict` {"rows": [...]} -> {"scores": [...]}, one score per row, in order.
The parameters come from models/train.py (params.json beside this file).
"""
import json
import math
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))


def load_scorer(path):
    with open(path, encoding="utf-8") as f:
        p = json.load(f)
    b0, b_worth, b_gifts = p["intercept"], p["log10_net_worth"], p["gifts_last_year"]
    b_region = p["region"]
    b_years, b_years_missing, b_board = p["years_since_first_gift"], p["years_since_first_gift_missing"], p["board_member"]
    log10, exp = math.log10, math.exp

    def score(row):
        z = b0 + b_worth * log10(max(row["net_worth"], 0.0) + 1.0) + b_gifts * row["gifts_last_year"]
        z += b_region[row["region"]]
        years = row.get("years_since_first_gift")   # optional: the adapter sends null when unknown
        z += b_years_missing if years is None else b_years * years
        if row.get("board_member"):
            z += b_board
        return 1.0 / (1.0 + exp(-z)) if z > -700 else 0.0

    return score


SCORE = load_scorer(os.path.join(HERE, "params.json"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive: the adapter reuses its connections
    disable_nagle_algorithm = True

    def _send(self, status, body):
        # One write for status line, headers and body: no small-packet delays on keep-alive.
        self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, self.responses[status][0].encode(), len(body), body))

    def do_GET(self):
        if self.path == "/health":
            self._send(200, b'{"status":"ok"}')
        else:
            self._send(404, b'{"error":"not found"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/predict":
            self._send(404, b'{"error":"not found"}')
            return
        try:
            scores = [SCORE(row) for row in json.loads(body)["rows"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._send(400, json.dumps({"error": f"cannot score these rows: {e!r}"}).encode())
            return
        self._send(200, json.dumps({"scores": scores}).encode())

    def log_message(self, format, *args):
        pass    # no per-request log lines: this model is also the latency baseline


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128    # the stdlib's 5 resets connections when a burst of clients arrives at once


def main():
    server = Server((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))), Handler)
    print(f"donor-propensity listening on {server.server_address[0]}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
