"""The run report: one self-contained HTML file rendered from a run directory alone.

A coordinator opens it after (or during) a federated run to see what happened: the settings
and the privacy guarantee, every round (which sites were asked, which answered, which failed
and why, the aggregation weights), per-round curves of loss, AUC, weights and ε, and the final
test table. It is rendered only from ``config.json``, ``metrics.jsonl`` and ``final.json``
(``server.run_files``), so it can be produced again at any time, on any machine, from a copied
run directory, without Flower or the hospitals.

One job per module: ``content`` (with ``rounds``, ``final``, ``settings``, ``cells``,
``paths``) computes what the page says as plain data; ``series`` the curves' data;
``plots`` draws them with matplotlib; ``page`` renders the Jinja2 template
(``server/templates/report.html.j2``, autoescape on) and writes ``report.html``.
"""
