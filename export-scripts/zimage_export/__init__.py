"""The Python side of zimage: exporting a diffusers-format Z-Image folder to a zimage model
package (docs/package-format.md), the prompt enhancer's graphs (`enhancer`) and the test
fixtures (`fixtures`). The command-line scripts beside this package use it; install it with
`pip install -e export-scripts`."""
