"""``mergebench run``: the paper's study as resumable units of work, a results database and a leaderboard."""
