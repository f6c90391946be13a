"""The job report: ``qvlm_report.json`` and a self-contained ``report.html`` from the plan document.

``model`` turns the plan document into a typed, frozen ``Report`` (and back into ``qvlm_report.json``);
``charts`` draws it with matplotlib into inline SVG; ``page`` lays out the HTML. The rules the report
states (servability, bits per weight) are qvlm's own functions, called here, not restated. Imports
``qvlm`` and matplotlib only: no Ray, no storage.
"""

from cluster.report.model import Report, report_document, report_from_plan
from cluster.report.page import render_html

__all__ = ["Report", "render_html", "report_document", "report_from_plan"]
