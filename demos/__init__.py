"""accel.demos: the ``accel-demo`` Gradio app (``app``), its engine (``compare``) and its views (``render``)."""
