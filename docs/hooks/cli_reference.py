"""mkdocs hook: fills docs/reference/cli.md from msn's argparse parser at build time."""


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri == "reference/cli.md":
        from msn.cli_reference import cli_markdown

        return cli_markdown()
    return markdown
