"""Training data: record loading and validation, chat-template tokenization with
response masks (records), and the offline standard-library code set (stdlib_code)."""
