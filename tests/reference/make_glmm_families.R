# Reference values for GLMM families / links / offsets / weights (glmmTMB, with lme4 for information).
# Run: cd tests/reference && Rscript make_glmm_families.R
# Writes, into the current directory:
#   poisson_offset.csv poisson_slope.csv negbin.csv gamma_log.csv probit.csv
#   binomial_prop.csv gaussian_log.csv sleepstudy_w.csv glmm_families.json
# Each data set is simulated with its own fixed seed, rounded, written as CSV and read back,
# and the fits are made on the data as read back, so the CSV reproduces the fitted data exactly.
suppressPackageStartupMessages({
  library(lme4); library(glmmTMB); library(TMB); library(jsonlite)
})

script_name <- "make_glmm_families.R"

## ---------------------------------------------------------------- simulation helpers
n_groups <- 40L
make_groups <- function() {
  sizes <- sample(5:15, n_groups, replace = TRUE)
  labs <- sprintf("g%02d", seq_len(n_groups))
  list(g = rep(labs, sizes), idx = rep(seq_len(n_groups), sizes), n = sum(sizes))
}
write_and_read <- function(d, file) {
  write.csv(d, file, row.names = FALSE)
  r <- read.csv(file, stringsAsFactors = FALSE)
  r$g <- factor(r$g)
  if ("z" %in% names(r)) r$z <- factor(r$z, levels = c("a", "b"))
  r
}

## ---------------------------------------------------------------- result extraction
named <- function(v) as.list(v)

varcomp_of <- function(vc) {  # per grouping factor: terms, variances, sds, correlations
  lapply(vc, function(m) {
    sds <- attr(m, "stddev")
    out <- list(terms = I(names(sds)), variance = named(diag(as.matrix(m))), sd = named(sds))
    if (length(sds) > 1) {
      cr <- attr(m, "correlation")
      pairs <- list()
      for (i in 1:(length(sds) - 1)) for (j in (i + 1):length(sds))
        pairs[[paste(names(sds)[i], names(sds)[j], sep = ",")]] <- cr[i, j]
      out$correlation <- pairs
    }
    out
  })
}

varcomp_tmb <- function(fit) varcomp_of(VarCorr(fit)$cond)
varcomp_lme4 <- function(fit) varcomp_of(VarCorr(fit))

# nlminb followed by Newton steps on TMB's (Laplace) objective, used as glmmTMB's optimizer so that
# glmmTMB's own post-processing (sdreport, vcov, VarCorr, logLik) runs at the polished optimum.
# The Hessian is optimHess's finite difference of TMB's exact gradient; a step is kept only if it
# does not raise the objective.
newton_nlminb <- function(par, fn, gr, control = list(), ...) {
  r <- nlminb(par, fn, gr, control = control, ...)
  p <- r$par; f <- fn(p); steps <- 0L
  for (k in 1:6) {
    g <- as.numeric(gr(p))
    if (!all(is.finite(g)) || max(abs(g)) < 1e-11) break
    H <- optimHess(p, fn, gr)
    st <- tryCatch(solve(H, g), error = function(e) NULL)
    if (is.null(st)) break
    pn <- p - st; fnew <- fn(pn)
    if (!is.finite(fnew) || fnew >= f) break  # strict: keeps TMB's last.par.best at p
    p <- pn; f <- fnew; steps <- steps + 1L
  }
  f <- fn(p)  # leave TMB's internal state (last.par, random effects) at the final point
  list(par = p, objective = f, convergence = r$convergence, message = r$message,
       iterations = r$iterations, evaluations = r$evaluations, newton_steps = steps,
       nlminb_objective = r$objective)
}
polish <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4),
                         optimizer = newton_nlminb)

fit_tmb <- function(formula, data, family, ...) {
  glmmTMB(formula, data = data, family = family, control = polish, ...)
}

tmb_check <- function(fit) {
  obj <- fit$obj
  par <- fit$fit$par
  g <- obj$gr(par)
  H <- optimHess(par, obj$fn, obj$gr)
  dec <- tryCatch(0.5 * sum(g * solve(H, as.vector(g))), error = function(e) NA_real_)
  # restore TMB's internal state at the optimum
  invisible(obj$fn(par))
  list(max_abs_gradient = max(abs(fit$sdr$gradient.fixed)),
       max_abs_gradient_obj = max(abs(g)),
       newton_decrement = dec,
       pdHess = fit$sdr$pdHess,
       nlminb_convergence = fit$fit$convergence,
       nlminb_message = fit$fit$message,
       newton_steps = fit$fit$newton_steps,
       newton_logLik_gain = fit$fit$nlminb_objective - fit$fit$objective,
       tmb_par = list(names = names(par), values = unname(par)))
}

tmb_info <- function(fit) {
  fe <- fixef(fit)$cond
  se <- sqrt(diag(vcov(fit)$cond))
  out <- list(logLik = as.numeric(logLik(fit)),
              df = attr(logLik(fit), "df"),
              fixef = named(fe),
              se = named(se[names(fe)]),
              varcomp = varcomp_tmb(fit))
  fam <- family(fit)$family
  if (fam %in% c("nbinom2", "Gamma", "gaussian")) out$dispersion <- sigma(fit)
  c(out, tmb_check(fit))
}

lme4_loglik <- function(expr) {
  tryCatch({
    m <- withCallingHandlers(expr, warning = function(w) {
      message("lme4 warning: ", conditionMessage(w)); invokeRestart("muffleWarning")
    })
    as.numeric(logLik(m))
  }, error = function(e) {
    message("lme4 fit failed: ", conditionMessage(e)); NULL
  })
}

cases <- list()
case_entry <- function(formula, family, link, data, seed, truth, tmb, lme4_ll = NULL, extra = list()) {
  e <- list(formula = formula, family = family, link = link, nobs = nrow(data),
            ngroups = nlevels(data$g), seed = seed, truth = truth, glmmTMB = tmb)
  if (!is.null(lme4_ll)) e$lme4_logLik <- lme4_ll
  c(e, extra)
}

## ---------------------------------------------------------------- a. poisson_offset
seed <- 20240101L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.4)
x <- round(rnorm(G$n), 6)
t <- round(runif(G$n, 0.5, 3), 6)
y <- rpois(G$n, exp(0.3 + 0.5 * x + log(t) + b[G$idx]))
d <- write_and_read(data.frame(g = G$g, x = x, t = t, y = y), "poisson_offset.csv")
f <- y ~ x + offset(log(t)) + (1 | g)
ft <- fit_tmb(f, d, poisson)
cases$poisson_offset <- case_entry(
  deparse(f), "poisson", "log", d, seed,
  list(beta = c(0.3, 0.5), sd_g = 0.4),
  tmb_info(ft), lme4_loglik(glmer(f, data = d, family = poisson)))

## ---------------------------------------------------------------- b. poisson_slope
seed <- 20240102L; set.seed(seed)
G <- make_groups()
S <- matrix(c(0.5^2, 0.4 * 0.5 * 0.3, 0.4 * 0.5 * 0.3, 0.3^2), 2)
B <- matrix(rnorm(2 * n_groups), n_groups) %*% chol(S)
x <- round(rnorm(G$n), 6)
y <- rpois(G$n, exp(0.5 + B[G$idx, 1] + (0.3 + B[G$idx, 2]) * x))
d <- write_and_read(data.frame(g = G$g, x = x, y = y), "poisson_slope.csv")
f <- y ~ x + (1 + x | g)
ft <- fit_tmb(f, d, poisson)
cases$poisson_slope <- case_entry(
  deparse(f), "poisson", "log", d, seed,
  list(beta = c(0.5, 0.3), sd_g = c(0.5, 0.3), corr = 0.4),
  tmb_info(ft), lme4_loglik(glmer(f, data = d, family = poisson)))

## ---------------------------------------------------------------- c. negbin
seed <- 20240103L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.5)
x <- round(rnorm(G$n), 6)
z <- sample(c("a", "b"), G$n, replace = TRUE)
mu <- exp(0.5 + 0.4 * x - 0.3 * (z == "b") + b[G$idx])
y <- rnbinom(G$n, size = 2, mu = mu)
d <- write_and_read(data.frame(g = G$g, x = x, z = z, y = y), "negbin.csv")
f <- y ~ x + z + (1 | g)
ft <- fit_tmb(f, d, nbinom2)
cases$negbin <- case_entry(
  deparse(f), "nbinom2", "log", d, seed,
  list(beta = c(0.5, 0.4, -0.3), sd_g = 0.5, theta = 2),
  tmb_info(ft), lme4_loglik(glmer.nb(f, data = d)),
  list(dispersion_meaning = "theta (NB2 size): Var = mu + mu^2/theta"))

## ---------------------------------------------------------------- d. gamma_log
seed <- 20240104L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.4)
x <- round(rnorm(G$n), 6)
mu <- exp(1 + 0.4 * x + b[G$idx])
y <- signif(rgamma(G$n, shape = 3, scale = mu / 3), 10)
d <- write_and_read(data.frame(g = G$g, x = x, y = y), "gamma_log.csv")
f <- y ~ x + (1 | g)
ft <- fit_tmb(f, d, Gamma(link = "log"))
cases$gamma_log <- case_entry(
  deparse(f), "Gamma", "log", d, seed,
  list(beta = c(1, 0.4), sd_g = 0.4, shape = 3),
  tmb_info(ft), lme4_loglik(glmer(f, data = d, family = Gamma(link = "log"))),
  list(dispersion_meaning = "glmmTMB sigma = 1/sqrt(shape) (coefficient of variation)",
       shape = 1 / sigma(ft)^2,
       lme4_note = "lme4's Gamma logLik uses its own dispersion estimate; not comparable to glmmTMB's"))

## ---------------------------------------------------------------- e. probit
seed <- 20240105L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.6)
x <- round(rnorm(G$n), 6)
z <- sample(c("a", "b"), G$n, replace = TRUE)
eta <- 0.2 + 0.6 * x - 0.5 * (z == "b") + b[G$idx]
y01 <- rbinom(G$n, 1, pnorm(eta))
d <- write_and_read(data.frame(g = G$g, x = x, z = z, y01 = y01), "probit.csv")
f <- y01 ~ x + z + (1 | g)
ft <- fit_tmb(f, d, binomial(link = "probit"))
cases$probit <- case_entry(
  deparse(f), "binomial", "probit", d, seed,
  list(beta = c(0.2, 0.6, -0.5), sd_g = 0.6),
  tmb_info(ft), lme4_loglik(glmer(f, data = d, family = binomial(link = "probit"))),
  list(lme4_note = "glmmTMB gives the exact Laplace value; lme4's (nAGQ = 1) differs for non-canonical links"))

## ---------------------------------------------------------------- f. binomial_prop
seed <- 20240106L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.5)
x <- round(rnorm(G$n), 6)
n <- 1L + rpois(G$n, 8)
s <- rbinom(G$n, n, plogis(-0.3 + 0.7 * x + b[G$idx]))
d <- write_and_read(data.frame(g = G$g, x = x, s = s, n = n, p = s / n), "binomial_prop.csv")
d$p <- d$s / d$n  # exact proportions (CSV has them to 15 digits)
f <- p ~ x + (1 | g)
ft <- fit_tmb(f, d, binomial, weights = n)
f2 <- cbind(s, n - s) ~ x + (1 | g)
ft2 <- fit_tmb(f2, d, binomial)
i2 <- tmb_info(ft2)
cases$binomial_prop <- case_entry(
  deparse(f), "binomial", "logit", d, seed,
  list(beta = c(-0.3, 0.7), sd_g = 0.5),
  tmb_info(ft), lme4_loglik(glmer(f, data = d, family = binomial, weights = n)),
  list(weights = "n",
       cbind_formula = deparse(f2),
       glmmTMB_cbind = i2[c("logLik", "fixef", "se", "varcomp", "max_abs_gradient", "newton_decrement")],
       lme4_logLik_cbind = lme4_loglik(glmer(f2, data = d, family = binomial)),
       loglik_note = "full binomial log-likelihood including log choose(n, s)"))

## ---------------------------------------------------------------- g. gaussian_log
seed <- 20240107L; set.seed(seed)
G <- make_groups()
b <- rnorm(n_groups, 0, 0.3)
x <- round(rnorm(G$n), 6)
y <- round(rnorm(G$n, exp(1 + 0.3 * x + b[G$idx]), 0.5), 6)
d <- write_and_read(data.frame(g = G$g, x = x, y = y), "gaussian_log.csv")
f <- y ~ x + (1 | g)
# The simulated y has a nonpositive value or so (the likelihood is fine with it), which R's
# gaussian(link = "log")$initialize rejects; use the same family with mustart = pmax(y, 0.1).
gauss_log <- gaussian(link = "log")
gauss_log$initialize <- expression({
  n <- rep.int(1, nobs)
  mustart <- pmax(y, 0.1)
})
ft <- fit_tmb(f, d, gauss_log)
cases$gaussian_log <- case_entry(
  deparse(f), "gaussian", "log", d, seed,
  list(beta = c(1, 0.3), sd_g = 0.3, sigma = 0.5),
  tmb_info(ft),
  lme4_loglik(glmer(f, data = d, family = gauss_log)),
  list(dispersion_meaning = "residual sd",
       n_y_nonpositive = sum(d$y <= 0),
       start_note = "family initialize replaced by mustart = pmax(y, 0.1) (R's rejects y <= 0); the model is unchanged",
       lme4_note = "lme4's glmer logLik for gaussian with non-identity link (information only)"))

## ---------------------------------------------------------------- h. lmm_weights (lme4)
ss <- sleepstudy
ss$w <- 1 + (ss$Days %% 3) / 2
ss$Subject <- as.character(ss$Subject)
write.csv(ss[, c("Reaction", "Days", "Subject", "w")], "sleepstudy_w.csv", row.names = FALSE)
ssd <- read.csv("sleepstudy_w.csv", stringsAsFactors = FALSE)
ssd$Subject <- factor(ssd$Subject)
f <- Reaction ~ Days + (Days | Subject)

# Dense check of lme4's (RE)ML log-likelihood with precision weights:
# y ~ N(X b, Z Sigma Z' + sigma^2 W^-1); REML adds -0.5 log|X'V^-1X| + (p/2) log(2 pi).
dense_loglik <- function(m, reml) {
  X <- getME(m, "X"); Z <- as.matrix(getME(m, "Z")); y <- getME(m, "y")
  w <- weights(m)
  Lam <- as.matrix(getME(m, "Lambda")); s2 <- sigma(m)^2
  V <- s2 * (Z %*% Lam %*% t(Lam) %*% t(Z) + diag(1 / w))
  Vi <- solve(V)
  XtViX <- t(X) %*% Vi %*% X
  bhat <- solve(XtViX, t(X) %*% Vi %*% y)
  r <- y - X %*% bhat
  n <- length(y); p <- ncol(X)
  ldV <- as.numeric(determinant(V)$modulus)
  if (!reml) return(-0.5 * (n * log(2 * pi) + ldV + sum(r * (Vi %*% r))))
  -0.5 * ((n - p) * log(2 * pi) + ldV + as.numeric(determinant(XtViX)$modulus) + sum(r * (Vi %*% r)))
}

lmm_info <- function(m, reml) {
  fe <- fixef(m)
  vc <- varcomp_lme4(m)
  list(REML = reml, logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"),
       fixef = named(fe), se = named(sqrt(diag(as.matrix(vcov(m))))),
       varcomp = vc, sigma = sigma(m),
       theta = named(getME(m, "theta")),
       dense_check_logLik = dense_loglik(m, reml),
       optimizer_messages = m@optinfo$conv$lme4$messages)
}
m_reml <- lmer(f, data = ssd, weights = w, REML = TRUE)
m_ml <- lmer(f, data = ssd, weights = w, REML = FALSE)
cases$lmm_weights <- list(
  formula = deparse(f), family = "gaussian", link = "identity", nobs = nrow(ssd),
  ngroups = nlevels(ssd$Subject), weights = "w = 1 + (Days %% 3) / 2 (precision weights)",
  data = "lme4::sleepstudy",
  lme4_REML = lmm_info(m_reml, TRUE), lme4_ML = lmm_info(m_ml, FALSE),
  loglik_note = "lme4 logLik with prior weights: Var(e_i) = sigma^2 / w_i, includes 0.5*sum(log w)")

## ---------------------------------------------------------------- write
meta <- list(
  script = script_name,
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
  R = R.version.string,
  packages = list(glmmTMB = as.character(packageVersion("glmmTMB")),
                  TMB = as.character(packageVersion("TMB")),
                  lme4 = as.character(packageVersion("lme4")),
                  Matrix = as.character(packageVersion("Matrix")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  simulation = paste("each case: own set.seed (case$seed); 40 groups g01..g40 with sizes",
                     "sample(5:15, 40, replace = TRUE); x ~ N(0,1) rounded to 6 dp; z in {a, b};",
                     "fits use the CSV as read back (g, z as factors, z levels a, b)"),
  keys = list(
    formula = "model formula (R syntax)",
    family = "glmmTMB family name", link = "link function",
    nobs = "number of rows", ngroups = "number of levels of g", seed = "set.seed value",
    truth = "simulation parameters",
    glmmTMB = paste("glmmTMB fit; optimizer = nlminb (iter.max = eval.max = 1e4) followed by up to",
                    "6 Newton steps on TMB's objective (see newton_nlminb in the script)"),
    glmmTMB.logLik = "full log-likelihood (Laplace), as logLik()",
    glmmTMB.df = "number of estimated parameters",
    glmmTMB.fixef = "conditional-model fixed effects, named",
    glmmTMB.se = "sqrt(diag(vcov(fit)$cond)), named",
    glmmTMB.varcomp = paste("per grouping factor: terms, variance and sd per term,",
                            "correlation keyed 'term1,term2' for vector terms"),
    glmmTMB.dispersion = paste("sigma(fit): nbinom2 theta (size); Gamma 1/sqrt(shape);",
                               "gaussian residual sd (absent for poisson/binomial)"),
    glmmTMB.max_abs_gradient = "max |fit$sdr$gradient.fixed| (gradient of -logLik in TMB's parameters)",
    glmmTMB.max_abs_gradient_obj = "max |fit$obj$gr(fit$fit$par)|",
    glmmTMB.newton_decrement = "0.5 g' H^-1 g at the optimum: predicted further logLik gain",
    glmmTMB.newton_steps = "Newton steps taken after nlminb",
    glmmTMB.newton_logLik_gain = "logLik gained by the Newton steps over nlminb's optimum",
    glmmTMB.pdHess = "sdreport's positive-definite-Hessian flag",
    glmmTMB.tmb_par = "TMB's fixed parameter vector (beta, betad = log dispersion, theta = log sd / corr params)",
    lme4_logLik = paste("lme4::glmer (or glmer.nb) logLik with default control, for information",
                        "(differs from glmmTMB for non-canonical links / Gamma / gaussian glmer)"),
    case_extras = paste("other per-case keys are self-describing notes or extras: dispersion_meaning,",
                        "shape (Gamma, 1/sigma^2), *_note, weights, cbind_formula, glmmTMB_cbind and",
                        "lme4_logLik_cbind (binomial_prop via cbind(s, n - s)), n_y_nonpositive (gaussian_log)"),
    lmm_theta = "lme4's theta (relative Cholesky factor of the random-effect covariance, column-wise lower triangle)",
    lmm_dense_check_logLik = "the same (RE)ML logLik recomputed with dense matrices, V = sigma^2 (Z Lambda Lambda' Z' + W^-1)",
    lmm_weights = paste("lme4::lmer fits with prior weights; lme4_REML / lme4_ML hold logLik, fixef, se,",
                        "varcomp, residual sigma, theta and a dense-matrix recomputation of the logLik")))

out <- c(list(meta = meta), cases)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE, null = "null"),
           "glmm_families.json")
cat("wrote glmm_families.json\n")
for (nm in names(cases)) {
  cs <- cases[[nm]]
  if (!is.null(cs$glmmTMB))
    cat(sprintf("%-15s glmmTMB logLik %.10f  max|grad| %.2e  newton dec %.2e  lme4 %s\n", nm,
                cs$glmmTMB$logLik, cs$glmmTMB$max_abs_gradient, cs$glmmTMB$newton_decrement,
                if (is.null(cs$lme4_logLik)) "NA" else sprintf("%.10f", cs$lme4_logLik)))
  else
    cat(sprintf("%-15s REML %.10f (dense %.10f)  ML %.10f (dense %.10f)\n", nm,
                cs$lme4_REML$logLik, cs$lme4_REML$dense_check_logLik,
                cs$lme4_ML$logLik, cs$lme4_ML$dense_check_logLik))
}
