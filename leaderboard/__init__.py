"""Static leaderboard site builder and the schema of the published JSON.

* `leaderboard.export.export(store, out_dir)` scores the results store and writes the published
  data: one JSON per (suite, defense), a manifest and two CSVs, validated by ``schema/*.schema.json``,
  and ``claims.json``, the claims ledger (`leaderboard.claims`: each paper claim against these numbers).
* `leaderboard.site.build_site(store_or_export_dir, out_dir)` renders the static site from it.
* `leaderboard.site.serve(directory, port)` serves a built site locally.
"""
