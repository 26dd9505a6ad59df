// Where RequireJS finds anywidget's front end: beside this file in the book's _static folder, so that the widget
// manager (embed-amd.js, loaded next) renders the anywidget views from the book itself, offline, never a CDN.
require.config({ paths: { anywidget: new URL("anywidget", document.currentScript.src).href } });
