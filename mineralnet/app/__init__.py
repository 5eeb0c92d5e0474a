"""`mineralnet app MODEL`: a local web page over a trained run or an exported model.

`mineralnet.app.page` turns photos into the fields the page shows (no Gradio needed: it is what the
tests check); `mineralnet.app.ui` is the Gradio page (`pip install "mineralnet[app]"`), `mineralnet.app.cli`
the command line.
"""
