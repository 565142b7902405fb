"""``msn bench``: prompt sets (prompts), the timed run (harness) and the summary,
table and plots (report)."""
