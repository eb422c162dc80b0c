'use strict';
// Live refresh of the admin's fleet pages (analytics/admin.py). Each [data-live-url] element re-fetches
// its HTML fragment every data-live-seconds and swaps its [data-live-body]: the server draws the charts,
// this only moves HTML. Paused while the tab is hidden; a failed or expired-session fetch marks the
// figures stale (and says so) instead of blanking them. A [data-live-range] link inside switches the
// fragment's time range in place (and in the address bar), without reloading the page.
{
    function clock() {
        return new Date().toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', second: '2-digit'});
    }

    function live(region) {
        const body = region.querySelector('[data-live-body]');
        const text = region.querySelector('[data-live-text]');
        const seconds = Math.max(Number(region.dataset.liveSeconds) || 5, 1);
        let timer = null;
        let inFlight = null;

        function say(message, stale) {
            region.classList.toggle('fleet-stale', stale);
            if (text) {
                text.textContent = message;
            }
        }

        async function refresh() {
            clearTimeout(timer);
            if (document.hidden) {
                return;  // resumed by visibilitychange
            }
            if (inFlight) {
                inFlight.abort();
            }
            const controller = new AbortController();
            inFlight = controller;
            try {
                const response = await fetch(region.dataset.liveUrl, {
                    credentials: 'same-origin',
                    headers: {'Accept': 'text/html', 'X-Requested-With': 'XMLHttpRequest'},
                    signal: controller.signal,
                });
                if (response.redirected) {
                    say('Signed out: reload the page to sign in again', true);
                    return;  // no more polling: every call would land on the login page
                }
                if (!response.ok) {
                    throw new Error(String(response.status));
                }
                body.innerHTML = await response.text();
                say('Live · updated ' + clock(), false);
            } catch (error) {
                if (error.name === 'AbortError') {
                    return;
                }
                say('Not updated since ' + (region.dataset.liveOk || 'page load') + ' (' + error.message + '), retrying', true);
            } finally {
                if (inFlight === controller) {
                    inFlight = null;
                }
            }
            if (!region.classList.contains('fleet-stale')) {
                region.dataset.liveOk = clock();
            }
            timer = setTimeout(refresh, seconds * 1000);
        }

        region.addEventListener('click', function(event) {
            const link = event.target.closest('[data-live-range]');
            if (!link || !region.contains(link)) {
                return;
            }
            event.preventDefault();
            const url = new URL(region.dataset.liveUrl, window.location.href);
            url.searchParams.set('range', link.dataset.liveRange);
            region.dataset.liveUrl = url.pathname + url.search;
            const page = new URL(window.location.href);
            page.searchParams.set('range', link.dataset.liveRange);
            window.history.replaceState(null, '', page);
            region.querySelectorAll('[data-live-range]').forEach(function(other) {
                other.setAttribute('aria-current', other === link ? 'true' : 'false');
            });
            refresh();
        });
        document.addEventListener('visibilitychange', function() {
            if (!document.hidden) {
                refresh();
            }
        });
        region.dataset.liveOk = clock();
        say('Live · updated ' + region.dataset.liveOk, false);  // the browser's clock, as every later update
        timer = setTimeout(refresh, seconds * 1000);
    }

    document.addEventListener('DOMContentLoaded', function() {
        document.querySelectorAll('[data-live-url]').forEach(live);
    });
}
