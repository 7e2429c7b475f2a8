"""Static leaderboard site builder and the schema of the published JSON."""
