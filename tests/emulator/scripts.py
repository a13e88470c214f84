"""The JavaScript the emulator serves to a real Chromium: the fake ``grecaptcha`` and ``turnstile`` scripts
(each is prefixed with ``(function(){var C=<config>;`` by its server) and the Cloudflare interstitial page."""

GRECAPTCHA_JS = r"""
function pageId(){var id=null;try{id=sessionStorage.getItem('__arenaPage')}catch(e){}if(id)return id;
 id='';for(var i=0;i<24;i++)id+=Math.floor(Math.random()*16).toString(16);
 try{sessionStorage.setItem('__arenaPage',id)}catch(e){}return id}
// U1: this tab's own fetch() calls to its origin carry the tab's id; a replay from elsewhere does not.
if(!window.__arenaFetch){var realFetch=window.__arenaFetch=window.fetch;
 window.fetch=function(input,init){try{var u=new URL(typeof input==='string'?input:(input&&input.url)||String(input),
  location.href);if(u.origin===location.origin){init=Object.assign({},init||{});
  var h=new Headers(init.headers||(input instanceof Request?input.headers:undefined));h.set(C.pageHeader,pageId());
  init.headers=h}}catch(e){}return realFetch.call(this,input,init)}}
// U8: the live configuration a page can read the sitekey from, as real grecaptcha keeps it.
function remember(key){if(!/^6L/.test(key||''))return;var g=window.___grecaptcha_cfg=window.___grecaptcha_cfg||
 {count:0,isEnterprise:!C.noEnterprise,clients:{}};var n=Object.keys(g.clients).length;
 for(var i=0;i<n;i++)if(g.clients[i].Z.Y.sitekey===key)return;
 g.clients[n]={id:n,Z:{Y:{sitekey:key,size:'invisible',badge:'bottomright'}}};g.count=n+1}
remember(C.render);
function mint(key,action,v2){return fetch(C.base+'/__recaptcha/mint?sitekey='+encodeURIComponent(key||'')+
 '&action='+encodeURIComponent(action||'')+'&v2='+(v2?1:0)+'&ctx='+encodeURIComponent(pageId()),{credentials:'omit'})
 .then(function(r){if(!r.ok)throw new Error('recaptcha mint failed: '+r.status);return r.json()})
 .then(function(j){return j.token})}
var isReady=false,q=[];
setTimeout(function(){isReady=true;q.splice(0).forEach(function(cb){try{cb()}catch(e){console.error(e)}});
 if(C.onload&&typeof window[C.onload]==='function')window[C.onload]()},C.readyDelay);
var widgets={},nextId=0;
var api={
 ready:function(cb){if(isReady)setTimeout(cb,0);else q.push(cb)},
 execute:function(key,opts){
  if(typeof key==='number'||key===undefined&&Object.keys(widgets).length){var w=widgets[key||0];
   return w?mint(w.sitekey,'',true).then(function(t){w.token=t;if(w.cb)w.cb(t);return t}):Promise.reject(new Error('no widget'))}
  if(C.rejects)return Promise.reject(new Error('reCAPTCHA execute failed'));
  var k=C.wrongSitekey?'6LwrongwrongwrongwrongwrongwrongwrongAAA':(key||C.render);
  remember(k);return mint(k,opts&&opts.action,false)},
 render:function(el,p){var id=nextId++;p=p||{};var w={sitekey:p.sitekey,cb:p.callback,err:p['error-callback'],token:''};
  widgets[id]=w;setTimeout(function(){mint(w.sitekey,'',true).then(function(t){w.token=t;if(w.cb)w.cb(t)},
  function(e){if(w.err)w.err(e)})},C.readyDelay+50);return id},
 getResponse:function(id){var w=widgets[id||0];return w?w.token:''},
 reset:function(id){var w=widgets[id||0];if(w){w.token='';setTimeout(function(){mint(w.sitekey,'',true)
  .then(function(t){w.token=t;if(w.cb)w.cb(t)})},C.readyDelay+50)}}
};
var g=window.grecaptcha=window.grecaptcha||{};
g.ready=api.ready;g.execute=api.execute;g.render=api.render;g.getResponse=api.getResponse;g.reset=api.reset;
if(!C.noEnterprise)g.enterprise=api;
})();"""

TURNSTILE_JS = r"""
var ws={},n=0;
function el(x){return typeof x==='string'?document.querySelector(x):x}
var t=window.turnstile={
 ready:function(cb){setTimeout(cb,0)},
 render:function(container,p){p=p||{};var id='cf-chl-widget-'+(n++);var c=el(container);var box=null;
  if(c){box=document.createElement('div');box.id=id;box.className='cf-turnstile-fake';
   var inp=document.createElement('input');inp.type='hidden';inp.name='cf-turnstile-response';box.appendChild(inp);
   c.appendChild(box)}
  var w=ws[id]={p:p,token:'',box:box,timer:null};
  function run(){w.timer=setTimeout(function(){
   if(String(p.sitekey||'').indexOf('2x')===0){var cb=p['error-callback'];if(cb)cb('110200');return}
   fetch(C.base+'/__turnstile/mint?sitekey='+encodeURIComponent(p.sitekey||''),{credentials:'omit'})
   .then(function(r){return r.json()}).then(function(j){if(!ws[id])return;w.token=j.token;
    if(w.box)w.box.firstChild.value=j.token;if(p.callback)p.callback(j.token)},
    function(e){var cb=p['error-callback'];if(cb)cb(String(e))})},C.delay)}
  w.run=run;run();return id},
 execute:function(container,p){return t.render(container,p)},
 getResponse:function(id){var w=id?ws[id]:ws[Object.keys(ws)[0]];return w?w.token:undefined},
 reset:function(id){var w=id?ws[id]:ws[Object.keys(ws)[0]];if(w){clearTimeout(w.timer);w.token='';w.run()}},
 remove:function(id){var w=ws[id];if(w){clearTimeout(w.timer);if(w.box&&w.box.parentNode)w.box.parentNode.removeChild(w.box);
  delete ws[id]}},
 isExpired:function(){return false}
};
if(C.onload&&typeof window[C.onload]==='function')setTimeout(window[C.onload],0);
})();"""


# Posted by the interactive widget to the challenge page once its click was accepted.
SOLVED_MESSAGE = "cf-challenge-solved"


def challenge_html(host: str, widget_id: str, delay_ms: int, interactive: bool = False) -> str:
    """The interstitial. It solves itself after ``delay_ms``, or (``interactive``) only reloads once its widget
    posts that a click on the checkbox was accepted."""
    solve = ("addEventListener('message',function(e){if(e.origin===location.origin&&"
             f"e.data==='{SOLVED_MESSAGE}')location.reload()}});" if interactive else
             "setTimeout(function(){fetch('/cdn-cgi/challenge-platform/solve',{method:'POST',"
             f"credentials:'same-origin'}}).then(function(){{location.reload()}})}},{delay_ms});")
    return ("<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title>"
            "<meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\">"
            "<meta name=\"robots\" content=\"noindex,nofollow\"></head><body>"
            "<div class=\"main-wrapper\" role=\"main\"><div class=\"main-content\">"
            f"<h1 class=\"zone-name-title h1\">{host}</h1>"
            "<p id=\"challenge-body-text\">Verify you are human by completing the action below.</p>"
            "<noscript><div class=\"h2\"><span id=\"challenge-error-text\">"
            "Enable JavaScript and cookies to continue</span></div></noscript>"
            "<div id=\"cf-turnstile\"><iframe title=\"Widget containing a Cloudflare security challenge\" "
            f"src=\"/cdn-cgi/challenge-platform/challenges.cloudflare.com/turnstile/if/ov2/{widget_id}/normal\" "
            "width=\"300\" height=\"65\"></iframe></div></div></div>"
            f"<script>{solve}</script></body></html>")


def widget_html(widget_id: str | None) -> str:
    """The challenge iframe: a spinner that is already ticked (``None``: the delay solves it), or an unticked
    checkbox whose first trusted click (a real or CDP-driven input event, not a script's ``el.click()``) posts
    the widget's id to the solve endpoint and tells the page (a refused id reloads it: a new challenge)."""
    if widget_id is None:
        return "<!DOCTYPE html><html><body><label><input type=checkbox checked> Verifying...</label></body></html>"
    return ("<!DOCTYPE html><html><body><label><input type=checkbox id=\"cf-chl-widget\"> Verify you are human"
            "</label><script>var box=document.getElementById('cf-chl-widget');"
            "box.addEventListener('click',function(e){if(!e.isTrusted){e.preventDefault();return}box.disabled=true;"
            "fetch('/cdn-cgi/challenge-platform/solve',{method:'POST',credentials:'same-origin',"
            f"headers:{{'Content-Type':'application/json'}},body:JSON.stringify({{widget:'{widget_id}'}})}})"
            f".then(function(r){{if(r.ok)parent.postMessage('{SOLVED_MESSAGE}',location.origin);"
            "else parent.location.reload()})});"
            "</script></body></html>")
