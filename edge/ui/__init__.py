"""The operator view: a read-only web page served by the station process (`edge run
--ui-port N`). feed.py: the station tap and the encoder thread; view.py: what the page reads;
http.py: the server; static/: the page (plain JS + SVG, no build step, no CDN)."""
