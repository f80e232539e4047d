from dpface.ops.build import report

print(report())
